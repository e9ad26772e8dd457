"""Weights copied into memory advised for transparent huge pages (runtime.models.huge_pages)."""
from __future__ import annotations

import mmap

import pytest
import torch

from memory_maps import vm_flags
from pagedkv.runtime.models.huge_pages import into_huge_pages

pytestmark = pytest.mark.skipif(not hasattr(mmap, "MADV_HUGEPAGE"), reason="no transparent huge pages here")


def test_copies_keep_values_types_and_shapes_in_an_advised_mapping():
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(300, 576, generator=g), torch.randn(7, generator=g).bfloat16(),
               torch.randint(0, 255, (4097,), dtype=torch.uint8, generator=g)]
    moved = into_huge_pages(tensors)
    for old, new in zip(tensors, moved):
        assert torch.equal(old, new) and new.dtype == old.dtype and new.shape == old.shape
        assert new.data_ptr() != old.data_ptr() and new.data_ptr() % 4096 == 0
        assert "hg" in vm_flags(new.data_ptr())  # "hg": madvise(MADV_HUGEPAGE)
    moved[0][0, 0] = 1e6  # copies, not views of the originals
    assert tensors[0][0, 0] != 1e6


def test_tensors_it_cannot_move_stay_as_they_are():
    strided = torch.randn(8, 8).t()
    assert into_huge_pages([strided, torch.randn(3)])[0] is strided
    assert into_huge_pages([]) == []


def streamed_matrices(model) -> list[torch.Tensor]:
    """The weights a decode step streams in plain layouts: the embedding, F.linear's float32
    matrices and the 4-bit kernel's (oneDNN's packed ones are opaque to torch)."""
    from pagedkv.runtime.models.llama import DualWeight
    from pagedkv.runtime.models.quant import Int4Linear

    found = [model.embed]
    for w in model.linear_weights():
        if isinstance(w, DualWeight):
            found.append(w.plain)
        elif isinstance(w, Int4Linear):
            found.append(w.packed.data)
        elif w.layout == torch.strided:
            found.append(w)
    return found


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_models_streamed_weights_live_in_huge_pages(tiny_model, dtype):
    from pagedkv.runtime.models.llama import LlamaModel
    from pagedkv.runtime.models.loader import load_model

    loaded = load_model(tiny_model(num_layers=2), dtype=dtype)
    model = LlamaModel(loaded.config, loaded.weights, torch.device("cpu"), dtype)
    matrices = streamed_matrices(model)
    # The embedding, and the plain layouts of the tied lm_head and 4 matrices a layer, where the
    # model keeps them beside oneDNN's packed ones (float32; bfloat16 with AVX512-BF16).
    assert len(matrices) == (1 + 1 + 4 * 2 if model.dual else 1)
    assert model.dual or dtype == torch.bfloat16
    assert all("hg" in vm_flags(t.data_ptr()) for t in matrices)
