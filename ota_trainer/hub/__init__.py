"""The Hub edge: resolve repo ids to commit shas, download what a merge needs, publish.

The only module that talks to the network. Everything goes through the real
``huggingface_hub`` client and its cache, so ``HF_TOKEN``, ``HF_ENDPOINT``, ``HF_HOME`` and
``HF_HUB_OFFLINE=1`` (merge from the cache alone) behave as users expect.

A model reference is a local folder, or ``org/name`` optionally pinned as ``org/name@rev``
(branch, tag or commit sha). Every revision is resolved to a commit sha once; that sha is
used for every download and recorded in the merged model's card.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import FormatError, HubError, IncompatibleModelsError
from ..io.layout import (
    CONFIG_NAME,
    MERGE_READY_TAG,
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    SIDE_FILES,
    read_config,
    read_json_file,
)

logger = logging.getLogger(__name__)

__all__ = [
    "ModelRef",
    "parse_ref",
    "HubResolver",
    "merge",
    "WEIGHT_PATTERNS",
    "MOMENT_PATTERNS",
    "MERGE_READY_TAG",
]

# what a merge downloads of each model: config, weights (single file or shards + index), side files
WEIGHT_PATTERNS = (
    CONFIG_NAME,
    SAFE_WEIGHTS_NAME,
    "model-*.safetensors",
    SAFE_WEIGHTS_INDEX_NAME,
    *SIDE_FILES,
    "trainer_state.json",
)  # the training step the weights are at: checked against the moments'
MOMENT_PATTERNS = ("ota/moments.safetensors", "ota/ffg_histogram.safetensors")  # (the histogram: when shipped)
ADAPTER_PATTERNS = ("adapter_config.json", "adapter_model.safetensors")  # LoRA adapters (ota_trainer.merger.adapters)
# Training leftovers never pushed with an expert (as Trainer.push_to_hub does).
EXPERT_IGNORE = ["checkpoint-*", "checkpoint-*/**", "runs/**", "*.pt", "*.pth", "training_args.bin", ".*", "**/.*"]
_RETRIES = 3


@dataclass(frozen=True)
class ModelRef:
    """A model reference: a local folder, or a Hub repo id with an optional revision."""

    text: str
    repo_id: str | None = None
    revision: str | None = None
    local: Path | None = None

    @property
    def is_local(self) -> bool:
        return self.local is not None


def parse_ref(text: str) -> ModelRef:
    """``"path/to/folder"`` (an existing folder) or ``"org/name[@revision]"``.

    Raises:
        FormatError: a path (``.``, ``/``, ``~``, or deeper than ``org/name``) to no folder.
        HubError: neither an existing folder nor a valid repo id.
    """
    p = Path(text).expanduser()
    if p.is_dir():
        return ModelRef(text, local=p)
    if text.startswith((".", "/", "~")) or os.sep in text.strip("/").replace("/", "", 1):
        raise FormatError(f"{text!r}: no such folder (and not a Hub repo id like 'org/name[@revision]')", path=text)
    repo, _, rev = text.partition("@")
    parts = repo.split("/")
    if text.startswith((".", "/", "~")) or len(parts) > 2 or not all(parts) or (rev == "" and "@" in text):
        raise HubError(
            f"{text!r} is neither an existing folder nor a Hub repo id like 'org/name[@revision]'", repo_id=text
        )
    return ModelRef(text, repo_id=repo, revision=rev or None)


def _translate(e: Exception, ref: ModelRef, what: str = "") -> HubError:
    """A clear HubError for a huggingface_hub / HTTP failure."""
    from huggingface_hub import errors as hf

    repo = ref.repo_id or ref.text
    rev = f"@{ref.revision}" if ref.revision else ""
    if isinstance(e, hf.GatedRepoError):
        msg = f"{repo}: access denied (gated or private); set HF_TOKEN to a token with access"
    elif isinstance(e, hf.RepositoryNotFoundError):
        msg = f"{repo}: repository not found, or private and no valid token was sent (set HF_TOKEN)"
    elif isinstance(e, hf.RevisionNotFoundError):
        msg = f"{repo}: revision {ref.revision!r} not found"
    elif isinstance(e, hf.LocalEntryNotFoundError):
        msg = (
            f"{repo}{rev}: {what or 'files'} not in the local cache and the Hub is not reachable "
            "(HF_HUB_OFFLINE=1 merges from the cache alone: download once online first)"
        )
    elif isinstance(e, hf.EntryNotFoundError):
        msg = f"{repo}{rev}: {what or 'file'} not found in the repository"
    else:
        msg = f"{repo}{rev}: Hub request failed ({type(e).__name__}: {e})"
    return HubError(msg, repo_id=repo)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _transient(e: Exception) -> bool:
    from huggingface_hub import errors as hf

    if isinstance(
        e, (hf.RepositoryNotFoundError, hf.RevisionNotFoundError, hf.EntryNotFoundError, hf.LocalEntryNotFoundError)
    ):
        return False
    if isinstance(e, hf.HfHubHTTPError):
        status = getattr(getattr(e, "response", None), "status_code", None)
        return status is None or status >= 500 or status == 429
    return isinstance(e, (OSError, ConnectionError, TimeoutError)) or "httpx" in type(e).__module__


@dataclass
class HubResolver:
    """Resolves model references to local folders through the HF cache.

    Call it with a reference to get a local folder (downloading what a merge needs at the
    resolved sha). ``shas`` records ``repo_id -> sha`` for the model card.

    Args:
        token: Hub token (default: ``HF_TOKEN`` / the cached login).
        need_moments: also download ``ota/moments.safetensors``.
        cache_dir: HF cache (default: ``$HF_HOME/hub``).
    """

    token: str | bool | None = None
    need_moments: bool = True
    cache_dir: str | None = None
    shas: dict[str, str] = field(default_factory=dict)
    _refs: dict[str, ModelRef] = field(default_factory=dict)

    def ref(self, text: str) -> ModelRef:
        if text not in self._refs:
            self._refs[text] = parse_ref(text)
        return self._refs[text]

    def _retry(self, ref: ModelRef, what: str, fn: Callable[[], Any]) -> Any:
        for attempt in range(_RETRIES):
            try:
                return fn()
            except Exception as e:  # huggingface_hub and httpx raise many types; translated below
                if attempt + 1 < _RETRIES and _transient(e) and not _offline():
                    logger.warning("%s: %s failed (%s); retrying", ref.text, what, e)
                    time.sleep(0.5 * 2**attempt)
                    continue
                raise _translate(e, ref, what) from e
        raise AssertionError("unreachable")

    def sha(self, text: str) -> str | None:
        """The commit sha a reference resolves to (``None`` for local folders)."""
        ref = self.ref(text)
        if ref.is_local:
            return None
        if ref.repo_id in self.shas:
            return self.shas[ref.repo_id]
        if _offline():
            sha = self._cached_sha(ref)
        else:
            from huggingface_hub import HfApi

            info = self._retry(
                ref, "revision", lambda: HfApi(token=self.token).model_info(ref.repo_id, revision=ref.revision)
            )
            sha = info.sha
        self.shas[ref.repo_id] = sha
        return sha

    def _cached_sha(self, ref: ModelRef) -> str:
        """Offline: the sha the cache knows for a reference.

        Downloads pinned by sha record no branch ref in the cache, so a reference without a
        revision resolves to the repo's only cached snapshot (ambiguous when there are several).
        """
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            folder = snapshot_download(
                ref.repo_id,
                revision=ref.revision,
                allow_patterns=["config.json"],
                local_files_only=True,
                cache_dir=self.cache_dir,
                token=self.token,
            )
            return Path(folder).name
        except LocalEntryNotFoundError as e:
            cache = (
                Path(self.cache_dir or constants.HF_HUB_CACHE)
                / ("models--" + ref.repo_id.replace("/", "--"))
                / "snapshots"
            )
            snaps = sorted(p.name for p in cache.iterdir()) if cache.is_dir() else []
            if ref.revision is None and len(snaps) == 1:
                return snaps[0]
            if len(snaps) > 1:
                raise HubError(
                    f"{ref.text}: HF_HUB_OFFLINE=1 and the cache holds {len(snaps)} revisions of {ref.repo_id} "
                    f"({', '.join(s[:10] for s in snaps)}); pin one with {ref.repo_id}@<sha>",
                    repo_id=ref.repo_id,
                ) from e
            raise _translate(e, ref, "config.json") from e

    def config(self, text: str) -> dict[str, Any]:
        """The model's ``config.json`` (downloads only that file)."""
        ref = self.ref(text)
        if ref.is_local:
            return read_config(ref.local, text)  # validated and confined as every input file is
        from huggingface_hub import hf_hub_download

        sha = self.sha(text)
        try:
            path = self._retry(
                ref,
                "config.json",
                lambda: hf_hub_download(
                    ref.repo_id, "config.json", revision=sha, cache_dir=self.cache_dir, token=self.token
                ),
            )
        except HubError as e:
            from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

            # no config.json in the repo (or, offline, in the cache): a LoRA adapter has none. Online,
            # "not found locally" means the Hub did not answer (huggingface_hub's own retries spent):
            # that is the error, and asking for the adapter's file too only doubled the wait
            # (measured on a failing server: 23 s -> 47 s)
            cause = e.__cause__
            missing = isinstance(cause, EntryNotFoundError) and (
                _offline() or not isinstance(cause, LocalEntryNotFoundError)
            )
            if missing and self.adapter_config(text) is not None:
                return {}  # a LoRA adapter: its base's architecture; the adapter is checked against the base's tensors
            raise
        return read_config(Path(path).parent, text)

    def patterns(self) -> list[str]:
        return list(WEIGHT_PATTERNS) + list(ADAPTER_PATTERNS) + (list(MOMENT_PATTERNS) if self.need_moments else [])

    def adapter_config(self, text: str) -> dict[str, Any] | None:
        """A LoRA adapter's ``adapter_config.json`` (downloads only that file), None when the
        reference is not an adapter."""
        from ..merger.adapters import ADAPTER_CONFIG, is_adapter_folder, open_adapter

        ref = self.ref(text)
        if ref.is_local:
            return open_adapter(ref.local, text).config if is_adapter_folder(ref.local) else None
        from huggingface_hub import hf_hub_download

        sha = self.sha(text)
        try:
            path = self._retry(
                ref,
                ADAPTER_CONFIG,
                lambda: hf_hub_download(
                    ref.repo_id, ADAPTER_CONFIG, revision=sha, cache_dir=self.cache_dir, token=self.token
                ),
            )
        except HubError:
            return None
        return read_json_file(Path(path), f"{text}: {ADAPTER_CONFIG}")

    def plan(self, text: str) -> list[tuple[str, int | None, bool]]:
        """Files a merge would download: ``(path, size, already cached)``; downloads nothing."""
        ref = self.ref(text)
        if ref.is_local:
            return [
                (str(p.relative_to(ref.local)), p.stat().st_size, True)
                for p in sorted(ref.local.rglob("*"))
                if p.is_file() and _matches(str(p.relative_to(ref.local)), self.patterns())
            ]
        from huggingface_hub import snapshot_download

        sha = self.sha(text)
        infos = self._retry(
            ref,
            "file list",
            lambda: snapshot_download(
                ref.repo_id,
                revision=sha,
                allow_patterns=self.patterns(),
                cache_dir=self.cache_dir,
                token=self.token,
                dry_run=True,
            ),
        )
        return [(i.filename, i.file_size, i.is_cached) for i in infos]

    def __call__(self, text: str) -> Path:
        ref = self.ref(text)
        if ref.is_local:
            return ref.local
        from huggingface_hub import snapshot_download

        sha = self.sha(text)
        folder = self._retry(
            ref,
            "weights",
            lambda: snapshot_download(
                ref.repo_id,
                revision=sha,
                allow_patterns=self.patterns(),
                cache_dir=self.cache_dir,
                token=self.token,
                local_files_only=_offline(),
            ),
        )
        return Path(folder)


def _matches(path: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatch(path, p) for p in patterns)


def check_architectures(resolver: HubResolver, base: str | None, experts: list[str]) -> None:
    """Compare every expert's ``config.json`` architecture with the base's, before any weights are downloaded.

    Raises:
        IncompatibleModelsError: an expert's architecture or model type differs.
    """
    refs = ([base] if base else []) + experts
    configs = {r: resolver.config(r) for r in refs}
    ref0 = refs[0]
    want = (configs[ref0].get("architectures"), configs[ref0].get("model_type"))
    for r in refs[1:]:
        got = (configs[r].get("architectures"), configs[r].get("model_type"))
        if want[0] and got[0] and (got != want):
            raise IncompatibleModelsError(
                f"{r}: architecture {got[0]} ({got[1]}) differs from {ref0}'s {want[0]} ({want[1]}); "
                "experts must be fine-tuned from the same base",
                model=r,
            )


def merge(
    recipe,
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    quiet: bool = False,
    resolver: HubResolver | Callable[[str], Path] | None = None,
    fast_path: bool = True,
    extra_inputs: Iterable[str | os.PathLike] = (),
):
    """:func:`ota_trainer.merger.merge` with models given as local folders or Hub repo ids
    (``org/name[@revision]``, resolved to commit shas once): ``ota_trainer.merge`` is this.

    In order: ``out_dir`` checked and locked; every architecture compared from ``config.json``
    (before any weights are downloaded); the inputs downloaded (only what the method needs),
    opened and checked; the merge run. Same arguments, returns and errors as
    :func:`ota_trainer.merger.merge`, plus :class:`~ota_trainer.errors.HubError`.

    Args:
        resolver: default ``HubResolver(need_moments=...)`` as the method needs (a token or
            cache folder of your own: pass one); any callable ``reference -> folder`` works too.
        extra_inputs: more paths ``out_dir`` must not touch (e.g. the recipe file).
    """
    from ..io.write import output_for
    from ..merger import as_recipe
    from ..merger import merge as merge_resolved
    from ..merger.adapters import fill_base_model

    if isinstance(recipe, dict) and not recipe.get("base_model"):  # LoRA adapters name their base
        lookup = getattr(resolver, "adapter_config", None) or HubResolver(need_moments=False).adapter_config
        recipe = fill_base_model(recipe, lookup)
    recipe = as_recipe(recipe)
    resolver = resolver or HubResolver(need_moments=recipe.spec.needs_moments)
    with output_for(recipe, out_dir, overwrite=overwrite, resolver=resolver, extra=list(extra_inputs)) as output:
        if isinstance(resolver, HubResolver):  # configs only (a callable resolver: the headers' checks below)
            check_architectures(resolver, recipe.base_model, [m.model for m in recipe.models])
        # every input opened and checked, once, for whichever backend runs; adapters made full experts first
        return merge_resolved(recipe, out_dir, quiet=quiet, resolver=resolver, fast_path=fast_path, output=output)


def publish_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    token: str | bool | None = None,
    commit_message: str = "Upload merged model (ota_trainer)",
    ignore_patterns: list[str] | None = None,
) -> str:
    """Upload a folder to ``repo_id`` in ONE commit (creating the repo if needed).

    Returns:
        The commit sha.

    Raises:
        HubError: the repo cannot be created or written (no token, no access...).
    """
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    ref = ModelRef(repo_id, repo_id=repo_id)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(
            repo_id=repo_id, folder_path=str(folder), commit_message=commit_message, ignore_patterns=ignore_patterns
        )
    except Exception as e:  # huggingface_hub / httpx errors: translated to one clear HubError
        raise _translate(e, ref, "upload") from e
    return info.oid


def mark_merge_ready(readme: str | os.PathLike, *, base_model: str | None = None) -> None:
    """Add merge-ready metadata to a model card (created if absent): the ``ota-merge-ready`` and
    ``ota-moments-v1`` tags, ``ota_moments_format_version`` and, when known, ``base_model``."""
    from huggingface_hub import ModelCard

    from ..moments.format import FORMAT_VERSION, FORMAT_VERSION_TAG

    path = Path(readme)
    card = (
        ModelCard(path.read_text())
        if path.is_file()
        else ModelCard("---\n---\n\n# Expert\n\nTrained with ota_trainer's OTACallback.\n")
    )
    tags = list(card.data.tags or [])
    tags += [t for t in (MERGE_READY_TAG, FORMAT_VERSION_TAG) if t not in tags]
    card.data.tags = tags
    card.data.ota_moments_format_version = FORMAT_VERSION
    if base_model and not card.data.get("base_model") and "/" in base_model and not Path(base_model).exists():
        card.data.base_model = base_model
    path.write_text(str(card))


def check_adapter_moments(folder: str | os.PathLike) -> str:
    """A LoRA adapter folder's moments cover exactly the weights it adapts, under the base weights'
    names and shapes (as OTACallback's LoRA capture writes them); returns the adapter's base.

    Raises:
        MissingMomentsError: no moments file.
        IncompatibleModelsError: moments of other weights (e.g. of the adapter factors).
    """
    from ..errors import MissingMomentsError
    from ..io.folders import open_moments_file
    from ..io.layout import moments_path
    from ..merger.adapters import open_adapter

    adapter = open_adapter(folder)
    path = moments_path(adapter.path)
    if not path.is_file():
        raise MissingMomentsError(
            f"{adapter.label}: no ota/moments.safetensors: train the adapter with OTACallback() (it captures the "
            "curvature of the adapted weights)",
            model=adapter.label,
        )
    moments = open_moments_file(path, adapter.label)
    want = {n: m.shape for n, m in adapter.modules.items()}
    got = dict(moments.shapes)
    if got != want:
        other = sorted(set(got) ^ set(want))[:3]
        raise IncompatibleModelsError(
            f"{adapter.label}: its moments name {len(got)} weights, the adapter adapts {len(want)} (e.g. {other}): "
            "moments of the adapter's own factors (lora_A/lora_B) or of another adapter; capture them again with "
            "OTACallback() during LoRA training",
            model=adapter.label,
        )
    return adapter.base_model


def push_expert(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    token: str | bool | None = None,
    base_model: str | None = None,
) -> str:
    """Push an expert trained elsewhere (weights + ``ota/moments.safetensors``, and
    ``ota/ffg_histogram.safetensors`` when :func:`~ota_trainer.save_ffg_histogram` wrote one) in
    one commit.

    The moments are validated against the weights first (names and shapes, finite,
    non-negative), and the model card is marked merge-ready.

    Returns:
        The commit sha.

    Raises:
        MissingMomentsError, IncompatibleModelsError, FormatError: the folder is not merge-ready.
        HubError: the upload failed.

    Example:
        >>> push_expert("out/math-expert", "me/smollm2-math", base_model="HuggingFaceTB/SmolLM2-135M-Instruct")
    """
    from ..merger.adapters import is_adapter_folder
    from ..merger.inputs import check_moments, missing_moments_error, open_model, open_moments
    from ..moments.format import MomentsReader

    if is_adapter_folder(folder):  # a LoRA adapter: its moments cover exactly the weights it adapts
        base_model = base_model or check_adapter_moments(folder)
        what = "LoRA expert"
    else:
        model = open_model(folder)
        layout = open_moments(model)
        if layout is None:
            raise missing_moments_error(model)
        check_moments(model, layout, list(layout.shapes), allow_missing=False)
        with MomentsReader(layout, model=model.label) as moments:
            for name in moments:
                moments[name]  # reads and checks every tensor (finite, non-negative)
        base_model = base_model or moments.metadata.get("base_model")
        what = "expert"
    mark_merge_ready(Path(folder) / "README.md", base_model=base_model)
    return publish_folder(
        folder,
        repo_id,
        private=private,
        token=token,
        commit_message=f"Upload {what} with OTA moments",
        ignore_patterns=EXPERT_IGNORE,
    )
