from smollm_ref.summary import main


def test_summary_compare_hf_counts_equal(capsys):
    assert main(["--config", "smollm2-tiny", "--compare-hf", "--depth", "1"]) == 0
    out = capsys.readouterr().out
    assert "per-module parameter counts equal" in out
    assert out.count("3,244,352") >= 2  # smollm_ref and transformers totals


def test_summary_labels_read_as_meant(capsys):
    import transformers

    assert main(["--config", "smollm2-tiny", "--compare-hf", "--depth", "1"]) == 0
    out = capsys.readouterr().out
    assert f"== transformers {transformers.__version__} LlamaForCausalLM" in out
    assert "transformers transformers" not in out
    assert "Units." not in out and out.count("Total mult-adds (M): ") == 2


def test_summary_bad_config(capsys):
    assert main(["--config", "no-such-preset"]) == 2
    assert "unknown model config" in capsys.readouterr().err
