"""KiviConfig validation: every bad field is named with the rule it breaks."""

from __future__ import annotations

import pytest

from kivi_compile import Compiler, KiviConfig


def test_defaults_are_k2v2_g32_r128_inductor():
    config = KiviConfig()
    assert (config.key_bits, config.value_bits, config.group_size, config.residual_length) == (2, 2, 32, 128)
    assert config.compiler is Compiler.INDUCTOR


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(key_bits=3), r"key_bits=3: must be one of \(2, 4, 8\)"),
        (dict(value_bits=1), r"value_bits=1: must be one of"),
        (dict(group_size=0), r"group_size=0: must be a positive integer"),
        (dict(residual_length=-128), r"residual_length=-128: must be a positive integer"),
        (dict(group_size=6, residual_length=12), r"group_size=6: must be a multiple of 4"),
        (dict(group_size=32, residual_length=48), r"residual_length=48: must be a multiple of group_size=32"),
        (dict(compiler="tvm"), r"compiler='tvm': must be one of"),
        (dict(cuda_graphs="no"), r"cuda_graphs='no': must be True or False"),
        (dict(per_channel_keys=1), r"per_channel_keys=1: must be True or False"),
    ],
)
def test_bad_config_names_the_field_and_the_rule(fields, message):
    with pytest.raises(ValueError, match=message):
        KiviConfig(**fields)


def test_config_is_frozen_and_hashable():
    config = KiviConfig(key_bits=4)
    with pytest.raises(AttributeError):
        config.key_bits = 2  # type: ignore[misc]
    assert hash(config) == hash(KiviConfig(key_bits=4))


def test_head_dim_check_names_both_numbers():
    with pytest.raises(ValueError, match="group_size=32 does not divide the head dim 48"):
        KiviConfig().check_head_dim(48)
