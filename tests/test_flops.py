"""FLOPs accounting (pipeline/training/flops.py): the paper's numbers, its formulas written out, and a direct count of
the model's matmul FLOPs with torch's FlopCounterMode."""

from __future__ import annotations

import json

import pytest
import torch

from model import ModelConfig
from pipeline.training.flops import forward_flops, main, speedup, training_flops
from tp_worker import VOCAB, make_batch


def large(arch):
    return ModelConfig.preset("large", arch)


def base(arch):
    return ModelConfig.preset("base", arch)


@pytest.mark.parametrize("make,arch,rate,seq_len,expected", [
    (large, "3ml-self", 0.5, 128, 1.46),   # issue 6 / §6.1
    (large, "3ml-self", 0.4, 128, 1.34),   # Table 3
    (large, "3ml-cross", 0.4, 128, 1.36),  # Table 3 prints 1.37
    (base, "3ml-self", 0.5, 512, 1.28),    # Table 3, longer recipe
    (base, "3ml-self", 0.4, 512, 1.22),    # Table 3
])
def test_speedups_over_roberta_match_the_paper(make, arch, rate, seq_len, expected):
    assert speedup(make(arch), rate, make("mlm"), 0.15, seq_len) == pytest.approx(expected, abs=0.006)


def test_formulas_written_out_as_in_appendix_d():
    # RoBERTa-base, eq. (2) with the 4d FFN: 2b(l(24nd^2 + 4n^2d) + 2nr(d^2 + d|V|))
    b, n, d, l, r, v = 8, 512, 768, 12, 0.15, 50265
    expected = 2 * b * (l * (24 * n * d * d + 4 * n * n * d) + 2 * n * r * (d * d + d * v))
    assert training_flops(base("mlm"), b, n, r) == pytest.approx(expected, rel=1e-12)
    # 3MLself-large, eq. (3)
    n, r, de, dd, le, ld, v = 128, 0.5, 1024, 512, 24, 2, 50265
    ne = (1 - 0.8 * r) * n
    blk = lambda n_, d_: 24 * n_ * d_ * d_ + 4 * n_ * n_ * d_  # noqa: E731
    expected = 2 * (2 * ne * de * dd + le * blk(ne, de) + ld * blk(n, dd) + 2 * n * r * (dd * de + de * v))
    assert training_flops(large("3ml-self"), 1, n, r) == pytest.approx(expected, rel=1e-12)
    # 3MLcross-large, eq. (4)
    nd = 0.8 * r * n
    cblk = 4 * ne * dd * dd + 28 * nd * dd * dd + 4 * ne * nd * dd + 4 * nd * nd * dd
    expected = 2 * (2 * ne * de * dd + le * blk(ne, de) + ld * cblk
                    + 2 * ne * (0.2 * r / (1 - 0.8 * r)) * (de * de + de * v) + 2 * nd * (dd * de + de * v))
    assert training_flops(large("3ml-cross"), 1, n, r) == pytest.approx(expected, rel=1e-12)
    # batch and the forward/backward factor scale linearly
    assert training_flops(base("mlm"), 4, 512, 0.15, fwd_bwd_factor=3) == pytest.approx(
        12 * forward_flops(base("mlm"), 512, 0.15))


def test_actual_ffn_width_is_used():
    wide = ModelConfig.preset("base", "mlm", ffn_size=4096)
    n, d = 512, 768
    extra = 2 * 12 * 4 * n * d * (4096 - 3072)
    assert training_flops(wide, 1, n, 0.15) - training_flops(base("mlm"), 1, n, 0.15) == pytest.approx(extra)


@pytest.mark.parametrize("arch", ["mlm", "3ml-self", "3ml-cross"])
def test_formula_matches_counted_matmul_flops_of_the_model(single_process_group, arch):
    """FlopCounterMode counts every mm/addmm/bmm (and, with the mapping below, CPU SDPA) of one forward; with a
    batch whose counts are exactly n*r etc. (n=100, r=0.5, no padding) it must equal 2 x forward_flops."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    from model import build_model

    def cpu_sdpa(query, key, value, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(query, key, value)
    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_sdpa}
    batch_size, seq_len, rate = 2, 100, 0.5
    batch = make_batch(batch_size=batch_size, seq_len=seq_len, rate=rate, n_pad_last=0, pad_multiple=1)
    config = ModelConfig.preset("mini", arch, vocab_size=VOCAB, vocab_pad_multiple=1, hidden_dropout=0.0,
                                attention_dropout=0.0)
    model = build_model(config)
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        model(batch)
    counted = counter.get_total_flops()
    predicted = batch_size * forward_flops(config, seq_len, rate)
    assert counted == pytest.approx(predicted, rel=0.02)


def test_cli_json(capsys):
    assert main(["--preset", "large", "--arch", "3ml-self", "--rate", "0.5", "--batch", "4096", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["speedup"] == pytest.approx(1.46, abs=0.006)
    assert report["candidate"]["seq_len"] == 128 and report["baseline"]["masking_rate"] == 0.15
    assert report["candidate"]["flops_per_step"] == pytest.approx(training_flops(large("3ml-self"), 4096, 128, 0.5))
    assert main(["--preset", "base", "--rate", "1.5"]) == 1


def test_parameter_counts_match_table3(single_process_group):
    from model.params import PAPER_PARAMS_M, count_parameters

    for (preset, arch), paper_millions in PAPER_PARAMS_M.items():
        config = ModelConfig.preset(preset, arch, vocab_pad_multiple=1)
        counts = count_parameters(config)
        assert counts["total"] / 1e6 == pytest.approx(paper_millions, abs=1.5), (preset, arch)
        assert counts["encoder"] + counts["pretraining_only"] == counts["total"]
        if arch == "mlm":
            assert counts["pretraining_only"] == 0


@pytest.mark.parametrize("content, reason", [("{", "Expecting property name"), ("[1]", "got list"), (None, "not found"),
                                             ('{"model": [1]}', 'its "model" section is not a JSON object')])
def test_cli_bad_config_file_is_one_line_naming_it(tmp_path, capsys, content, reason):
    """--config that is missing, not JSON or not an object: one line naming the file, no traceback."""
    from pipeline.errors import run_cli

    path = tmp_path / "model.json"
    if content is not None:
        path.write_text(content)
    assert run_cli(lambda: main(["--config", str(path)])) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"error: {path}: ") and reason in err, err
