"""CPU-side loader behaviour: argument packing, pointer coercion, skips without a GPU."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

from edge_vla.kernels import loader


def test_pack_args_points_at_values() -> None:
    addresses, storage = loader.pack_args("pif", [0x1234, -7, 0.5])
    assert addresses.dtype == np.uint64 and len(addresses) == 3 and len(storage) == 3
    assert ctypes.c_uint64.from_address(int(addresses[0])).value == 0x1234
    assert ctypes.c_int32.from_address(int(addresses[1])).value == -7
    assert ctypes.c_float.from_address(int(addresses[2])).value == 0.5


def test_pack_args_rejects_wrong_arity_and_codes() -> None:
    with pytest.raises(loader.KernelError, match="takes 2"):
        loader.pack_args("pp", [1])
    with pytest.raises(loader.KernelError, match="unknown argument code"):
        loader.pack_args("x", [1])


def test_as_ptr_accepts_common_handles() -> None:
    class Tensor:
        def data_ptr(self) -> int:
            return 42

    class Buf:
        ptr = 7

    assert loader.as_ptr(None) == 0
    assert loader.as_ptr(np.uint64(9)) == 9
    assert loader.as_ptr(Tensor()) == 42
    assert loader.as_ptr(Buf()) == 7


def test_every_kernel_has_a_module() -> None:
    assert set(loader.MODULE_OF.values()) == {"ode_step", "adaln_linear"}
    assert loader.MODULE_OF["time_embed_schedule_f32"] == "ode_step"
    assert loader.MODULE_OF["linear_v1_bf16"] == "adaln_linear"


def test_gpu_status_reports_a_reason() -> None:
    ok, why = loader.gpu_status()
    assert isinstance(ok, bool) and why  # on a CPU box: the reason; on a GPU box: the device name
