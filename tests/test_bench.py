"""``python -m dfm_jax.bench`` (``training/benchmark.py``): the methods it compares and its
table (never its timings)."""

import dataclasses

import pytest
import train_utils
from absl import app

from dfm_jax.training import benchmark as bench


def test_methods_are_the_twins_with_fm_first():
    config = train_utils.tiny_config()
    configs = bench.method_configs(config, ["cascaded", "dfm", "pyramidal", "dfm"])
    assert list(configs) == [
        "FM (1 scale)",
        "Cascaded (2 models)",
        "DFM (2 scales)",
        "Pyramidal (2 stages)",
    ]
    methods = [settings.method for settings in configs.values()]
    assert methods == ["flow_matching", "cascaded", "dfm", "pyramidal"]
    dfm = configs["DFM (2 scales)"]
    assert configs["FM (1 scale)"].total_steps == dfm.total_steps
    # A Pyramidal step is cheaper (coarse stage, split batch): more steps at equal FLOPs.
    assert configs["Pyramidal (2 stages)"].total_steps > dfm.total_steps


def test_unknown_method_is_a_usage_error():
    with pytest.raises(app.UsageError, match="unknown \\['flux'\\]; choose from fm, dfm"):
        bench.method_configs(train_utils.tiny_config(), ["dfm", "flux"])


def _result(name, step_seconds, total_steps):
    return bench.Result(name, 1.0, 0.1, step_seconds, 64 / step_seconds, 0.01, 0.1, 0.1, None,
                        2**20, None, total_steps)  # fmt: skip


def test_table_gives_step_and_equal_flops_run_ratios_to_fm():
    fm = _result("FM (1 scale)", 0.4, 2000)
    pyramidal = _result("Pyramidal (2 stages)", 0.25, 3200)
    table = bench.markdown([fm, pyramidal], baseline=fm)
    row = table.splitlines()[-1]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[0] == "Pyramidal (2 stages)" and cells[3] == "250.0"
    assert cells[4] == "0.625"  # step time / FM's
    assert cells[-1] == "1.000"  # 0.25 s x 3200 steps = 0.4 s x 2000 steps
    assert len(cells) == len(dataclasses.fields(bench.Result)) + 1  # + the step ratio


@pytest.mark.slow  # 8 s; compiles a real step (its numbers are test_train's)
def test_benchmark_times_the_real_step():
    configs = bench.method_configs(train_utils.tiny_config(), ["pyramidal"])
    configs.pop("FM (1 scale)")  # one compilation keeps the test short
    results, _ = bench.benchmark(configs, steps=2, warmup=0, rounds=2, matmul_flops=1e9)
    assert [r.name for r in results] == list(configs)
    for result in results:
        assert result.step_seconds > 0 and result.compiled_bytes > 0
        assert result.total_steps == configs[result.name].total_steps
