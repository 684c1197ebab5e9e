"""Kernel names (as torch.profiler reports them on an H100 / H200) into groups, and the grouped times."""

from __future__ import annotations

import pytest

from mmmamba.distill.kernel_time import group_kernel_times, kernel_group


@pytest.mark.parametrize("name,group", [
    ("nvjet_tst_192x192_64x4_2x1_v_bz_coopB_TNN", "gemm"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1", "gemm"),
    ("void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits>", "attention"),
    ("chunk_bwd_kernel_dqkwg", "ssd"), ("chunk_local_cumsum_scalar_kernel", "ssd"), ("_gla_prep_bwd_kernel", "ssd"),
    ("_conv_silu_fwd_kernel", "ssd"), ("_gated_norm_bwd_kernel", "norm"), ("_fwd_mse_kernel", "norm"),
    ("_rmsnorm_bwd_kernel", "norm"), ("_add_rmsnorm_kernel", "norm"),
    ("void at::native::(anonymous namespace)::fused_adam_kernel<float>", "optimizer"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>", "elementwise"),
    ("_silu_mul_bwd_kernel", "elementwise"), ("void at::native::cunn_SoftMaxForward<4, float>", "elementwise"),
    ("some_new_kernel", "other"),
])
def test_kernel_groups(name, group):
    assert kernel_group(name) == group


def test_group_kernel_times():
    out = group_kernel_times({"nvjet_a": (10, 6000.0), "nvjet_b": (5, 2000.0), "_rmsnorm_bwd_kernel": (30, 1500.0),
                              "mystery": (1, 500.0)}, top=2)
    assert out["total_ms"] == pytest.approx(10.0) and out["launches"] == 46
    assert list(out["groups"]) == ["gemm", "norm", "other"]
    assert out["groups"]["gemm"] == {"ms": 8.0, "launches": 15, "share": pytest.approx(0.8)}
    assert [r["kernel"] for r in out["top"]] == ["nvjet_a", "nvjet_b"]
