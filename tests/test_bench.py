"""The benchmark's code path (tests/bench.py) on miniature UNets, one repeat."""

import json

import bench
import pytest
import torch

BATCH = 2


@pytest.mark.parametrize(
    "spec,attn2,params",
    [(bench.SD15, 16, 859_520_964), (bench.SDXL, 70, 2_567_463_684)],
    ids=["sd15", "sdxl"],
)
def test_full_architectures(spec, attn2, params):
    unet = bench.meta_unet(spec)  # shapes only
    assert len(bench.attn2_modules(unet)) == attn2
    assert bench.count_params(unet) == params
    depths = {
        name: len(module.transformer_blocks)
        for name, module in unet.named_modules()
        if name.endswith(".1") and hasattr(module, "transformer_blocks")
    }
    if spec is bench.SDXL:
        assert depths == {
            **{f"input_blocks.{i}.1": 2 for i in (4, 5)},
            **{f"input_blocks.{i}.1": 10 for i in (7, 8)},
            "middle_block.1": 10,
            **{f"output_blocks.{i}.1": 10 for i in (0, 1, 2)},
            **{f"output_blocks.{i}.1": 2 for i in (3, 4, 5)},
        }
        assert unet.label_emb[0][0].in_features == 2816


@pytest.mark.parametrize("spec", [bench.TINY_SD1, bench.TINY_SDXL], ids=["sd1", "sdxl"])
def test_variants(spec):
    model = bench.ModelBench(spec, resolution=64, batch=BATCH)
    assert len(model.attn2) == spec.expected_attn2
    outputs = model.outputs()
    assert {key: out.shape[0] for key, out in outputs.items()} == {"a": 4, "b": 4, "c": 4, "d": 6, "e": 2}
    a, b, c, d, e = (outputs[key] for key in "abcde")
    assert torch.equal(b[BATCH:], a[BATCH:])  # uncond rows: bit-identical with NAG on
    assert torch.equal(c[BATCH:], a[BATCH:])
    assert (b[:BATCH] - a[:BATCH]).abs().max() > 1e-3 * a.abs().max()  # NAG moved the cond rows
    assert torch.allclose(e, b[:BATCH], rtol=1e-4, atol=1e-5 * b.abs().max().item())  # CFG 1: the same guided rows
    assert torch.allclose(d[: 2 * BATCH], a, rtol=1e-4, atol=1e-5 * a.abs().max().item())
    checks = model.checks(outputs)
    assert checks["b_uncond_bit_identical_to_a"] and checks["finite"]
    assert all(not hasattr(module, "forward") or "forward" not in module.__dict__ for module in model.attn2)  # unwrapped

    flops = model.flops()
    floor = model.analytic_floor(flops["attn2"], flops["counted"]["a"])
    assert flops["counted"]["b"] - flops["counted"]["a"] == floor["core_flops"]  # counter and analytic core agree
    assert flops["counted"]["e"] * 2 == pytest.approx(flops["counted"]["b"], rel=0.02)


def test_cpu_step_peak_is_the_live_allocation_peak():
    mib = 2**20

    def step():
        first = torch.empty(8 * mib, dtype=torch.uint8)
        second = torch.empty(4 * mib, dtype=torch.uint8)
        del first
        third = torch.empty(6 * mib, dtype=torch.uint8)
        return second, third

    assert bench.cpu_step_peak(step) == 12 * mib


def test_host_attention_is_restored():
    original = bench.CrossAttention.forward
    with bench.host_attention("sdp"):
        assert bench.CrossAttention.forward is bench.sdp_forward
    assert bench.CrossAttention.forward is original


def test_main_writes_every_number(tmp_path):
    path = tmp_path / "bench.json"
    bench.main(
        ["--models", "tiny-sd1,tiny-sdxl", "--resolution", "64", "--batch", "1", "--repeats", "1", "--warmup", "0", "--json", str(path)]
    )
    report = json.loads(path.read_text())
    assert set(report) == {"machine", "settings", "targets", "models"}
    assert set(report["models"]) == {"tiny-sd1", "tiny-sdxl"}
    for result in report["models"].values():
        assert result["architecture_ok"]
        assert set(result["variants"]) == set("abcde")
        for variant in result["variants"].values():
            assert {
                "label",
                "rows",
                "median_ms",
                "ratio_to_a",
                "times_ms",
                "peak_above_weights_mib",
                "peak_overhead_vs_a",
                "counted_flops",
            } <= set(variant)
            assert variant["median_ms"] > 0 and variant["peak_above_weights_mib"] > 0 and len(variant["times_ms"]) == 2  # one ABBA round
        assert {"core_flops", "elementwise_flops", "unet_flops_a", "fraction"} <= set(result["floor"])
        assert set(result["targets"]) == {"overhead", "floor", "cfg1_ratio", "memory"}
        assert all(isinstance(target["pass"], bool) for target in result["targets"].values())
        assert result["checks"]["b_uncond_bit_identical_to_a"] is True
        assert result["checks"]["c_uncond_bit_identical_to_a"] is True
        assert result["noise"]["a_iqr_over_median"] >= 0
