"""The hardware cost model: sizes read off model names, interpolated rates, memory fits and Ray's schedule."""

from __future__ import annotations

import pandas as pd
import pytest

from mcl_utils import hardware
from mcl_utils.errors import UserError

GPU = "NVIDIA H100 80GB HBM3"


def rates() -> pd.DataFrame:
    """Two measured sizes on one GPU: 1e8 parameters at 1e13 FLOP/s and 1e10 at 1e15."""
    table = pd.DataFrame({"device": [GPU, GPU], "n_params": [1e8, 1e10], "tokens_per_s": [5e4, 5e4]})
    table["model_flops_per_s"] = 2 * table["n_params"] * table["tokens_per_s"]
    return table


@pytest.mark.parametrize("spec, n_params", [("hf:Qwen/Qwen2.5-0.5B", 5e8), ("hf:Qwen/Qwen2.5-72B-Instruct", 7.2e10),
                                            ("hf:EleutherAI/pythia-70m-deduped@step143000", 7e7),
                                            ("hf:EleutherAI/pythia-160m-seed3", 1.6e8),
                                            ("hf:allenai/OLMo-2-0425-1B", 1e9), ("hf:google/gemma-3-270m", 2.7e8)])
def test_nominal_params_read_off_the_name(spec, n_params):
    """The last size in a repo name, M or B, is its parameter count; version numbers are not sizes."""
    assert hardware.nominal_params(spec) == n_params


def test_name_without_a_size_is_a_clear_error():
    """A name that states no size cannot be costed: the error says so and how to fix it."""
    with pytest.raises(UserError, match="states no size"):
        hardware.nominal_params("hf:openai-community/gpt2")


def test_rate_interpolates_log_log_and_holds_beyond():
    """Between measured sizes the rate is a power law; outside them it stays at the nearest one."""
    table = rates()
    assert hardware.flops_rate(table, GPU, 1e9) == pytest.approx(1e14)
    assert hardware.flops_rate(table, GPU, 1e7) == pytest.approx(1e13)
    assert hardware.flops_rate(table, GPU, 1e12) == pytest.approx(1e15)
    with pytest.raises(UserError, match="no measured scoring rate"):
        hardware.flops_rate(table, "cpu", 1e9)


def test_devices_needed_from_memory():
    """bf16 weights plus a tenth: 7B fits one 80 GiB GPU, 72B needs two, 400B does not fit a node of 8."""
    node = hardware.Tier("node", GPU, 8, 80, 2)
    assert [hardware.devices_needed(node, p) for p in (7e9, 7.2e10, 4e11)] == [1, 2, None]


def test_schedule_longest_first_on_the_devices_that_free_first():
    """Jobs of (hours, devices): two GPUs, jobs 3h, 2h, 2h and a 1h job on both give 5 hours."""
    assert hardware.schedule_hours([(3, 1), (2, 1), (2, 1)], 2) == 4
    assert hardware.schedule_hours([(3, 1), (2, 1), (2, 1), (1, 2)], 2) == 5
    assert hardware.schedule_hours([], 4) == 0


def test_study_hours_add_up():
    """Predicted hours are tokens x 2 FLOPs per parameter / rate; totals count device hours and misfits."""
    tiers = [hardware.Tier("one", GPU, 1, 80, 2), hardware.Tier("node", GPU, 8, 80, 2)]
    specs = ["hf:a/m-1B", "hf:a/m-72B"]
    per_model, totals = hardware.study_hours(specs, 3.6e6, tiers, rates())
    one = per_model[(per_model.tier == "one") & (per_model.model == "hf:a/m-1B")].iloc[0]
    assert one.hours == pytest.approx(3.6e6 * 2e9 / 1e14 / 3600)
    assert totals.set_index("tier").loc["one", "models_that_do_not_fit"] == 1
    node = totals.set_index("tier").loc["node"]
    big = per_model[(per_model.tier == "node") & (per_model.model == "hf:a/m-72B")].iloc[0]
    assert big.devices == 2 and node.device_hours == pytest.approx(2 * big.hours + one.hours)
    assert node.wall_hours == pytest.approx(big.hours)


def test_measured_rates_from_committed_results():
    """The committed loss tables and benchmark results give rates on the CPU and on the GPU they ran on."""
    table = hardware.measured_rates(hardware.REPO_ROOT / "results" / "losses")
    assert (table.model_flops_per_s > 0).all() and table.device.str.startswith("cpu").any()
