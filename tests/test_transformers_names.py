"""The cache's keyword and output field, for models written before and after transformers 5.24's rename."""

from __future__ import annotations

import dataclasses

from kivi_compile.transformers_names import cache_keyword, returned_cache


def forward_before(input_ids, past_key_values=None, use_cache=None): ...


def forward_after(input_ids, cache=None, use_cache=None, **kwargs): ...


@dataclasses.dataclass
class OutputBefore:
    logits: object = None
    past_key_values: object = None


@dataclasses.dataclass
class OutputAfter:
    logits: object = None
    cache: object = None

    @property
    def past_key_values(self):  # transformers keeps the old name as a warning alias
        raise AssertionError("the deprecated alias was read")


def test_the_keyword_follows_each_forward():
    assert cache_keyword(forward_before) == "past_key_values"
    assert cache_keyword(forward_after) == "cache"


def test_the_output_field_follows_each_output_and_skips_the_alias():
    cache = object()
    assert returned_cache(OutputBefore(past_key_values=cache)) is cache
    assert returned_cache(OutputAfter(cache=cache)) is cache
    assert returned_cache(OutputBefore()) is None
