"""bench/profile_step.py: host time, kernel time and the profiles of a training step."""

import json

from bench import profile_step


def test_profile_step_reports_times_and_tables(tmp_path):
    rows = profile_step.main(["--models", "MaskDiT-S/2", "--backends", "torch", "--batch", "2", "--input-size", "8",
                              "--steps", "2", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "profile_step.json").read_text())["rows"]
    assert len(rows) == len(saved) == 1
    r = saved[0]
    assert r["host_ms"] > 0 and r["wall_ms"] >= r["host_ms"] and r["profiler_ops_per_step"] > 100
    assert r["kernel_ms"] == 0.0 and r["kernel_ms_by_kind"] == {} and r["top_kernels"] == []  # no CUDA kernels
    assert "aten::" in r["tables"]["cpu"] and "train_step.py" in r["tables"]["cprofile_cumulative"]
    assert "| MaskDiT-S/2 | torch | 2 |" in (tmp_path / "profile_step.md").read_text()


def test_kernel_kinds_from_names():
    kind = profile_step.kernel_kind
    assert kind("nvjet_sm90_tst_192x192_64x4_2x1_v_bz_coopB_bias_TNN") == "matrix products"
    assert kind("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64") == "matrix products"
    assert kind("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3") == "attention"
    assert kind("void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel") == "attention"
    assert kind("void cudnn::some_helper_kernel") == "attention"  # any cuDNN kernel: cuDNN runs only attention here
    assert kind("_gated_residual_bwd_kernel") == kind("_gelu_tanh_grad_kernel") == kind("_column_sums_kernel") \
        == kind("_stack_qkv_grad_kernel") == kind("_patch_embed_fwd_kernel") == "fused Triton (kernels/)"
    assert kind("_lerp_kernel") == "optimizer and EMA (multi-tensor)"
    assert kind("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<...>") == \
        "optimizer and EMA (multi-tensor)"
    assert kind("void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl>") == \
        "other PyTorch kernels"
    assert kind("Memset (Device)") == kind("Memcpy DtoD (Device -> Device)") == "memset and memcpy"


def test_device_kernels_leave_out_host_events_and_annotated_ranges():
    """The optimizer's ``record_function`` range shows on the device as well: it must not count beside its
    kernels (the H100 profile of 2026-11-27 counted AdamW's 7.9 ms twice)."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    kernel = SimpleNamespace(name="multi_tensor_apply_kernel", device_type=DeviceType.CUDA, is_user_annotation=False)
    annotation = SimpleNamespace(name="Optimizer.step#AdamW.step", device_type=DeviceType.CUDA, is_user_annotation=True)
    host = SimpleNamespace(name="aten::mm", device_type=DeviceType.CPU, is_user_annotation=False)
    assert profile_step.device_kernels([host, annotation, kernel]) == [kernel]
