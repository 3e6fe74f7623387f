"""I/O at the edges: safetensors layouts and their validation (:mod:`.layout`), memory-mapped model folders
(:mod:`.checkpoint`), read-ahead into the page cache (:mod:`.readahead`), the streaming writer and the output folder
(:mod:`.write`). Standard library only, but for :mod:`.checkpoint`."""
