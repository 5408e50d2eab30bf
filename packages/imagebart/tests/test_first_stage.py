"""The remapped first stage: the list of used codes, loading the shipped VQGAN with a remap (list / .npy), and that
remapped indices address the original codebook vectors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from imagebart.first_stage import remapped_first_stage, used_codes
from taming.first_stage import load_first_stage

VQGAN = "pkg://taming/checkpoints/vqgan_fmnist"


@pytest.fixture(scope="module")
def vq_full():
    return load_first_stage(VQGAN)


def test_used_codes_are_the_sorted_unique_nearest_codes(vq_full, fmnist):
    x = fmnist[0][:8]
    idx = vq_full.encode_to_indices(x)  # (8, 8, 8) in the full codebook
    expected = torch.unique(idx.flatten())  # sorted
    got = used_codes(vq_full, [x[:3], x[3:]])  # several batches add up
    assert got.dtype == torch.long and torch.equal(got, expected)
    assert 1 < len(got) < vq_full.quantize.codebook().num_embeddings
    # listed in the full codebook's index space even when the VQGAN is already remapped
    assert torch.equal(used_codes(remapped_first_stage(VQGAN, remap=got.tolist()), [x]), expected)
    with pytest.raises(ValueError, match="no images given"):
        used_codes(vq_full, [])


def test_remapped_indices_address_the_original_codebook(vq_full, fmnist, used):
    x = fmnist[0][:8]
    vq = remapped_first_stage(VQGAN, remap=used)
    assert vq.vocab_size == len(used) and vq_full.vocab_size == 512
    assert not vq.training and all(not p.requires_grad for p in vq.parameters())
    idx = vq.encode_to_indices(x)
    assert int(idx.max()) < len(used)
    used_t = torch.tensor(used)
    assert torch.equal(used_t[idx], vq_full.encode_to_indices(x))  # remapped id i is code used[i]
    ids = torch.arange(len(used))
    entries = vq.quantize.get_codebook_entry(ids, None)
    torch.testing.assert_close(entries, vq.quantize.embedding.weight[used_t], rtol=0, atol=0)
    torch.testing.assert_close(entries, vq_full.quantize.embedding.weight[used_t], rtol=0, atol=0)
    # so the remapped model decodes its tokens to the same images as the full one decodes the original codes
    torch.testing.assert_close(vq.decode_code(idx), vq_full.decode_code(used_t[idx]))


def test_remap_from_an_npy_file(tmp_path, used):
    path = tmp_path / "fmnist_indices.npy"
    np.save(path, np.asarray(used))
    vq = remapped_first_stage(VQGAN, remap=path)
    assert vq.vocab_size == len(used) and vq.quantize.used.tolist() == used
    assert remapped_first_stage(VQGAN, remap=None).vocab_size == 512


def test_bad_remaps_are_refused(tmp_path):
    with pytest.raises(ValueError, match="remap=auto is resolved by imagebart-train"):
        remapped_first_stage(VQGAN, remap="auto")
    with pytest.raises(FileNotFoundError, match="remap file not found: .*missing.npy"):
        remapped_first_stage(VQGAN, remap=tmp_path / "missing.npy")
    with pytest.raises(FileNotFoundError, match="remap file not found"):
        remapped_first_stage(VQGAN, remap=str(tmp_path / "missing.npy"))
