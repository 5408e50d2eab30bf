"""Shared test helpers of twostream_inpaint."""

import re

import pytest


def _princeton_names(key: str) -> list[str]:
    """Official princeton-vl names of a torchvision raft_large key, written independently of the package's map."""
    key = key.replace("feature_encoder.", "fnet.").replace("context_encoder.", "cnet.")
    key = re.sub(r"^(fnet|cnet)\.convnormrelu\.0\.", r"\1.conv1.", key)
    key = re.sub(r"^(fnet|cnet)\.convnormrelu\.1\.", r"\1.norm1.", key)
    key = re.sub(r"^(fnet|cnet)\.conv\.", r"\1.conv2.", key)
    key = re.sub(r"convnormrelu(\d)\.0\.", r"conv\1.", key)
    key = re.sub(r"convnormrelu(\d)\.1\.", r"norm\1.", key)
    for tv, off in [
        ("motion_encoder.convcorr1.0", "encoder.convc1"),
        ("motion_encoder.convcorr2.0", "encoder.convc2"),
        ("motion_encoder.convflow1.0", "encoder.convf1"),
        ("motion_encoder.convflow2.0", "encoder.convf2"),
        ("motion_encoder.conv.0", "encoder.conv"),
        ("mask_predictor.convrelu.0", "update_block.mask.0"),
        ("mask_predictor.conv", "update_block.mask.2"),
    ]:
        key = key.replace(tv, off)
    key = re.sub(r"recurrent_block\.convgru(\d)\.conv(\w)", r"gru.conv\g<2>\g<1>", key)
    names = [f"module.{key}"]
    if ".downsample.1." in key:  # the official registers the downsample norm a second time as norm3
        names.append(f"module.{key.replace('downsample.1.', 'norm3.')}")
    return names


@pytest.fixture
def to_princeton():
    """A function: torchvision raft key -> its official princeton-vl name(s), written independently of the map."""
    return _princeton_names
