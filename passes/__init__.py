"""FX passes that turn attention over a growing KV cache into KIVI ops."""

from .kv_cache_rewrite import CallPlan, OutputSlot, RewriteResult, SiteRecord, rewrite_kv_attention

__all__ = ["CallPlan", "OutputSlot", "RewriteResult", "SiteRecord", "rewrite_kv_attention"]
