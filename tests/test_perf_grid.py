"""The perf grid's pieces on synthetic numbers: cases and ids, option parsing, percentiles, CSV."""
import argparse
import csv
import math

import pytest

from starcoder_tp.files import EMBEDDED_MODEL_DIR
from starcoder_tp.config import ModelConfig
from starcoder_tp.options import add_options
from starcoder_tp.suite.options import PYTEST_OPTIONS, case_pairs
from starcoder_tp.suite.perf import Case, CaseResult, PerfOptions, build_cases, check_cases, make_prompts, percentile
from starcoder_tp.suite.report import ASCEND_COLUMNS, COLUMNS, ResultsCSV, result_row, summary_lines, write_heatmaps


def test_default_grid_is_the_ascend_guides_36_cases_per_batch():
    options = PerfOptions(model_dir=str(EMBEDDED_MODEL_DIR))
    cases = options.cases()
    assert len(cases) == 5 * 36
    assert [c.id for c in cases if c.batch == 16][:3] == ["bs16-in32-out32", "bs16-in32-out64", "bs16-in32-out128"]
    assert cases[0] == Case(1, 32, 32) and cases[-1] == Case(32, 1024, 1024)


def test_runtime_mode_names_the_options_that_change_the_timed_steps():
    embedded = str(EMBEDDED_MODEL_DIR)
    assert PerfOptions(model_dir=embedded).runtime_mode == "eager"
    assert PerfOptions(model_dir=embedded, kernels="plain").runtime_mode == "eager-no-prepack"
    assert PerfOptions(model_dir=embedded, compile=True).runtime_mode == "compiled"
    assert PerfOptions(model_dir=embedded, compile=True, kernels="plain").runtime_mode == "compiled"


def test_case_pairs_replace_the_cross_product_and_ids_select_exactly():
    cases = build_cases([1, 16], None, None, case_pairs=case_pairs("256:64,256:256,512:512,1024:1024"))
    assert [c.id for c in cases] == ["bs1-in256-out64", "bs1-in256-out256", "bs1-in512-out512", "bs1-in1024-out1024",
                                     "bs16-in256-out64", "bs16-in256-out256", "bs16-in512-out512", "bs16-in1024-out1024"]
    assert [c.id for c in cases if "bs1-" in c.id] == [c.id for c in cases if c.batch == 1]  # -k "bs1-"


@pytest.mark.parametrize("option,text,message", [
    ("--batch-sizes", "1,x", "--batch-sizes: 'x' in '1,x' is not a whole number"),
    ("--batch-sizes", "0,4", "--batch-sizes: 0 in '0,4' must be >= 1"),
    ("--seq-in", "32,-5", "--seq-in: -5 in '32,-5' must be >= 1"),
    ("--seq-out", "32,32", "--seq-out: '32,32' lists a value twice"),
])
def test_int_lists_name_the_option_and_value(option, text, message):
    with pytest.raises(argparse.ArgumentError, match=message):
        parse(option, text)
    assert parse("--batch-sizes", " 1, 4 ,8").batch_sizes == (1, 4, 8)


def parse(*argv: str) -> argparse.Namespace:
    """The suite's options as pytest and bench declare them, parsed by argparse."""
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_options(parser.add_argument, PYTEST_OPTIONS)
    return parser.parse_args(argv)


def test_case_pairs_errors():
    with pytest.raises(argparse.ArgumentError, match="--case-pairs: '256-64' is not of the form IN:OUT"):
        parse("--case-pairs", "256:64,256-64")
    with pytest.raises(argparse.ArgumentError, match="--case-pairs: 0 in '0' must be >= 1"):
        parse("--case-pairs", "0:5")
    assert parse("--case-pairs", "256:64,512:512").case_pairs == ((256, 64), (512, 512))


def test_cases_beyond_positions_or_cache_are_refused_naming_the_case():
    config = ModelConfig.from_dir(EMBEDDED_MODEL_DIR)  # n_positions 4096
    with pytest.raises(ValueError, match="case bs1-in4000-out200: input \\+ output = 4200 tokens exceeds the model's n_positions=4096"):
        check_cases([Case(1, 4000, 200)], config, None)
    with pytest.raises(ValueError, match="case bs4-in512-out512: input \\+ output = 1024 tokens exceeds --max-seq-len 1000"):
        check_cases([Case(4, 512, 512)], config, 1000)
    with pytest.raises(ValueError, match="case bs1-in512-out1024: input \\+ output = 1536 tokens exceeds --max-seq-len 1500"):
        PerfOptions(model_dir=str(EMBEDDED_MODEL_DIR), max_seq_len=1500).check_cases()
    with pytest.raises(ValueError, match="world size 3 does not divide"):
        PerfOptions(model_dir=str(EMBEDDED_MODEL_DIR), world_size=3)
    with pytest.raises(ValueError, match="--perf-rounds must be >= 1, got 0"):
        PerfOptions(model_dir=str(EMBEDDED_MODEL_DIR), rounds=0)


def test_inputs_are_exactly_batch_by_seq_in_and_repeatable():
    prompts = make_prompts(Case(16, 128, 8), vocab_size=6144)
    assert len(prompts) == 16 and all(len(p) == 128 for p in prompts)
    assert all(19 <= t < 6144 for p in prompts for t in p)
    assert prompts == make_prompts(Case(16, 128, 8), vocab_size=6144)


def test_percentiles_interpolate_linearly():
    values = list(range(1, 101))  # 1..100
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 90) == pytest.approx(90.1)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile([7.0], 99) == 7.0 and math.isnan(percentile([], 50))


def fake_result(case=Case(2, 32, 4), first=(10.0, 12.0, 11.0), decode=((1.0, 2.0, 3.0),) * 3):
    result = CaseResult(case)
    for f, d in zip(first, decode):
        result.add_round(f, list(d), (case.batch, case.seq_out), [100 << 20, 120 << 20])
    return result


def test_case_result_statistics():
    result = fake_result()
    assert result.first_token_ms == 11.0  # median over rounds
    assert result.decode_ms_mean == 2.0 and result.decode_ms_percentile(50) == 2.0
    assert result.total_s == pytest.approx((11.0 + 6.0) / 1e3)
    assert result.tokens_per_s == pytest.approx(2 * 4 / 0.017)
    assert result.peak_memory_bytes == [100 << 20, 120 << 20]


@pytest.mark.parametrize("first,decode,shape,message", [
    (float("nan"), [1.0, 1.0, 1.0], (2, 4), "garbage time nan"),
    (5.0, [1.0, 0.0, 1.0], (2, 4), "garbage time 0.0"),
    (5.0, [1.0, 1.0, 1.0], (2, 3), "output shape \\(2, 3\\), expected \\(2, 4\\)"),
    (5.0, [1.0, 1.0], (2, 4), "2 decode steps timed, expected 3"),
])
def test_garbage_rounds_fail_the_case(first, decode, shape, message):
    with pytest.raises(RuntimeError, match=message):
        CaseResult(Case(2, 32, 4)).add_round(first, decode, shape, [1])


def row_for(result, runtime_mode="eager"):
    return result_row(result, world_size=2, dtype="float32", device="cpu", model="starcoder",
                      model_shape="L4-E256-H8-KV1-I1024-V6144", runtime_mode=runtime_mode, commit="abc")


def test_csv_columns_append_and_resume(tmp_path):
    path = tmp_path / "r" / "multibatch_performance_starcoder_0.csv"
    results = ResultsCSV(path)
    results.append(row_for(fake_result(Case(1, 32, 4))))
    with open(path, newline="") as f:
        header = next(csv.reader(f))
    assert header[:6] == ASCEND_COLUMNS == ["Batch", "Input_seq_len", "Output_seq_len", "TotalTime(s)",
                                           "first_token_time(ms)", "avg_token_time(ms)"]
    assert header == COLUMNS
    # A second run (after an interruption) appends and keeps what the first one measured.
    again = ResultsCSV(path)
    again.append(row_for(fake_result(Case(2, 32, 4))))
    rows = again.rows().to_dict("records")  # as written: text
    assert [(r["Batch"], r["Input_seq_len"], r["Output_seq_len"]) for r in rows] == [("1", "32", "4"), ("2", "32", "4")]
    assert rows[0]["first_token_ms_rounds"] == "10.0000;12.0000;11.0000"
    again.append(row_for(fake_result(Case(4, 32, 4)), runtime_mode="compiled"))
    ours = dict(dtype="float32", device="cpu", model="starcoder")
    assert again.measured_cases(world_size=2, runtime_mode="eager", **ours) == {Case(1, 32, 4), Case(2, 32, 4)}
    assert again.measured_cases(world_size=4, runtime_mode="eager", **ours) == set()
    # --perf-resume with --compile does not skip cases measured eagerly, and vice versa.
    assert again.measured_cases(world_size=2, runtime_mode="compiled", **ours) == {Case(4, 32, 4)}


def test_csv_with_other_columns_is_moved_aside_not_mixed(tmp_path):
    path = tmp_path / "multibatch_performance_starcoder_0.csv"
    path.write_text("Batch,Input_seq_len\n1,32\n")
    messages = []
    results = ResultsCSV(path, log=messages.append)
    assert results.rows().empty and "moved it to" in messages[0]
    assert len(list(tmp_path.glob("*.old.csv"))) == 1


def test_summary_has_a_table_per_batch_and_the_headline(tmp_path):
    rows = [row_for(fake_result(Case(b, i, 4))) for b in (1, 4) for i in (32, 64)]
    lines = summary_lines(rows)
    assert lines[0] == "batch 1:" and "batch 4:" in lines
    assert any(line.startswith("batch 1 headline (the Ascend guide's row): first token 11.00 ms") for line in lines)
    pngs = write_heatmaps(rows, tmp_path, "starcoder", 0)
    assert [p.name for p in pngs] == ["heatmap_bs1_starcoder_0.png", "heatmap_bs4_starcoder_0.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


def test_report_re_renders_a_results_folder_and_compares_two(tmp_path, capsys):
    """`python -m starcoder_tp report DIR DIR2`: tables and heatmaps from the CSV alone, and the
    cases both runs measured alike side by side, as ratios (the ones measured otherwise left out)."""
    from starcoder_tp.cli import main

    before, after = tmp_path / "before", tmp_path / "after"
    for folder, scale in ((before, 1.0), (after, 2.0)):
        results = ResultsCSV(folder / "multibatch_performance_starcoder_0.csv")
        for case in (Case(1, 32, 4), Case(4, 32, 4)):
            results.append(row_for(fake_result(case, first=[scale * f for f in (10.0, 12.0, 11.0)])))
    ResultsCSV(after / "multibatch_performance_starcoder_0.csv").append(
        row_for(fake_result(Case(8, 32, 4)), runtime_mode="compiled"))  # measured in one run only
    assert main(["report", str(before), str(after)]) == 0
    out = capsys.readouterr().out
    assert "batch 1 headline (the Ascend guide's row): first token 11.00 ms" in out
    assert "2 case(s) in both" in out and " 2.000 " in out and " 1.000" in out  # first token x2, decode unchanged
    joined = list(csv.DictReader(open(before / "report" / "comparison.csv")))
    assert [(r["Batch"], float(r["first_token_time(ms) ratio"])) for r in joined] == [("1", 2.0), ("4", 2.0)]
    assert (before / "report" / "heatmap_bs1_starcoder_0_ws2_float32_cpu_eager_0.png").is_file()
    assert sorted(p.name for p in before.iterdir()) == ["multibatch_performance_starcoder_0.csv", "report"]
    with pytest.raises(SystemExit):
        main(["report"])  # DIR is required
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "no multibatch_performance_*.csv in it" in capsys.readouterr().err
