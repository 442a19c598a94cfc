"""Upstream adapters: one small protocol (`base.Upstream`), one module per kind of upstream."""
