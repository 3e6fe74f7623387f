"""Test and demo helpers: tiny models, a loopback Hub."""
