"""bench/decoder_init.py (the 3ML decoder-embedding-init experiment, README) runs on the test corpus with either
init, and in 30 steps masked-token perplexity falls to under half of its start."""
import pytest


@pytest.mark.parametrize("init", ["content", "bert"])
def test_decoder_init_experiment_learns(run_bench_script, tiny_dataset_prefix, init):
    result = run_bench_script("decoder_init", "--data-prefix", str(tiny_dataset_prefix), "--init", init,
                              "--steps", "30", "--batch", "8", "--seq-len", "64", "--eval-interval", "30",
                              "--eval-batches", "4")
    first, last = result["records"][0], result["records"][-1]
    assert (first["step"], last["step"]) == (0, 30)
    assert last["ppl_masked"] < 0.5 * first["ppl_masked"], result["records"]
    assert 1.0 < result["unigram_perplexity"] < first["ppl_masked"]  # an untrained model is worse than unigram
