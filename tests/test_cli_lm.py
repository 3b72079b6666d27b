"""``sparsekernels prune`` on Hugging Face language model directories, offline: a tokenizer trained here (tokenizers'
WordLevel on generated text, wrapped in PreTrainedTokenizerFast), models built from config.json or loaded from their
safetensors weights, calibration on token ids from a text file, perplexity before and after, the result written
with save_pretrained and loaded back by plain from_pretrained. Every user error is one line and exit code 2, found
before the model is built. Also the perplexity helper itself."""
import json
import math
import random
import textwrap

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

import sparsekernels.app.language_model as lm  # noqa: E402
import sparsekernels.huggingface as skhf  # noqa: E402
from sparsekernels.nn import SparseLinear  # noqa: E402
from test_cli_safety import run_cli  # noqa: E402

WORDS = "the a model prunes heads sparse dense layer token weight fast small large cat dog runs eats sees and".split()


def sentences(n: int, seed: int) -> str:
    r = random.Random(seed)
    return "\n".join(" ".join(r.choice(WORDS[:8]) if r.random() < 0.7 else r.choice(WORDS)
                              for _ in range(r.randint(5, 14))) + " ." for _ in range(n))


def make_tokenizer():
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    trainer = tokenizers.trainers.WordLevelTrainer(special_tokens=["[UNK]", "[PAD]", "[EOS]"])
    tok.train_from_iterator(sentences(200, 1).splitlines(), trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                                eos_token="[EOS]")


def llama_config(vocab: int, **kw):
    return transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                    pad_token_id=1, eos_token_id=2, bos_token_id=2, **kw)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Folders: ``llama`` (config.json + tokenizer, no weights), ``gpt2`` (the same for GPT-2), and text files."""
    root = tmp_path_factory.mktemp("lm")
    tokenizer = make_tokenizer()
    vocab = len(tokenizer)
    for name, config in (("llama", llama_config(vocab)),
                         ("gpt2", transformers.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4,
                                                          n_positions=64, bos_token_id=2, eos_token_id=2))):
        config.architectures = ["LlamaForCausalLM" if name == "llama" else "GPT2LMHeadModel"]
        config.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    (root / "calib.txt").write_text(sentences(60, 2))
    (root / "eval.txt").write_text(sentences(20, 3))
    return root


def prune(data, out, *extra):
    return ["prune", str(data / "llama"), "--calib-text", str(data / "calib.txt"), "--eval-text",
            str(data / "eval.txt"), "--seq-len", "32", "--calib-samples", "3", "--out", str(out), "--no-progress",
            *extra]


def test_24_wanda_writes_a_compressed_directory_that_from_pretrained_loads(data, tmp_path, capsys):
    out = tmp_path / "llama24"
    code, stdout, err = run_cli(prune(data, out, "--pattern", "2:4", "--importance", "wanda"), capsys)
    assert code == 0, err
    record = json.loads((out / lm.REPORT_NAME).read_text())
    before, after = record["perplexity"]["before"], record["perplexity"]["after"]
    assert math.isfinite(before) and math.isfinite(after)
    assert f"perplexity on --eval-text (32-token windows): {before:.3f} -> {after:.3f}" in stdout
    assert "calibration: 3 sample(s) x 32 tokens from --calib-text" in stdout
    assert "built from" in stdout and "random weights" in stdout
    assert "left dense: lm_head: the output layer (lm_head) stays dense" in stdout
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "sparsekernels"
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    sparse = [n for n, m in loaded.named_modules() if isinstance(m, SparseLinear)]
    assert len(sparse) == 14 and "lm_head" not in sparse
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert skhf.perplexity(loaded, tokenizer, (data / "eval.txt").read_text(), seq_len=32) == pytest.approx(after)


def test_channels_update_the_config_and_round_trip(data, tmp_path, capsys):
    out = tmp_path / "llama_ch"
    code, stdout, err = run_cli(prune(data, out, "--pattern", "channels", "--ratio", "0.5"), capsys)
    assert code == 0, err
    assert "model.config: intermediate_size 64 -> 32, num_attention_heads 4 -> 2, num_key_value_heads 2 -> 1" in stdout
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert loaded.model.layers[1].self_attn.k_proj.out_features == 8 and loaded.config.num_key_value_heads == 1
    record = json.loads((out / lm.REPORT_NAME).read_text())
    assert record["params"]["after"] < record["params"]["before"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    ppl = skhf.perplexity(loaded, tokenizer, (data / "eval.txt").read_text(), seq_len=32)
    assert ppl == pytest.approx(record["perplexity"]["after"])


def test_gpt2_channels_through_conv1d(data, tmp_path, capsys):
    out = tmp_path / "gpt2_ch"
    code, stdout, err = run_cli(["prune", str(data / "gpt2"), "--pattern", "channels", "--seq-len", "16",
                             "--out", str(out), "--no-progress"], capsys)
    assert code == 0, err
    assert "example: 16 random token ids (no --calib-text)" in stdout
    assert "model.config: n_inner None -> 64" in stdout and "heads kept: GPT2Config" in stdout
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert loaded.transformer.h[0].mlp.c_fc.nf == 64


def test_a_directory_with_weights_is_loaded_not_rebuilt(data, tmp_path, capsys):
    source = tmp_path / "trained"
    torch.manual_seed(5)
    model = transformers.LlamaForCausalLM(llama_config(len(make_tokenizer()))).eval()
    model.save_pretrained(source)
    make_tokenizer().save_pretrained(source)
    out = tmp_path / "unstructured"
    code, stdout, err = run_cli(["prune", str(source), "--pattern", "unstructured", "--ratio", "0.25", "--seq-len", "16",
                             "--out", str(out), "--no-progress"], capsys)
    assert code == 0, err
    assert "random weights" not in stdout
    pruned = transformers.AutoModelForCausalLM.from_pretrained(out)
    w, w0 = pruned.model.layers[0].mlp.up_proj.weight, model.model.layers[0].mlp.up_proj.weight
    kept = w != 0
    assert float((~kept).float().mean()) == pytest.approx(0.25, abs=1 / w.numel())
    assert torch.equal(w[kept], w0[kept])  # the checkpoint's own values


@pytest.fixture
def no_build(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the command built the model before it checked its arguments")

    monkeypatch.setattr(lm, "build_language_model", refuse)


def _folder(tmp_path, name, files):
    folder = tmp_path / name
    folder.mkdir()
    for file, text in files.items():
        (folder / file).write_bytes(text if isinstance(text, bytes) else text.encode())
    return folder


@pytest.mark.parametrize("case, needle", [
    ("out-safetensors", "expected --out to be a folder"),
    ("out-not-empty", "the folder is not empty"),
    ("calib-missing", "--calib-text"),
    ("wanda-without-text", "--importance wanda calibrates on text: give --calib-text FILE"),
    ("input-shape", "--input-shape does not apply to a Hugging Face model directory"),
    ("calib-batches", "--calib-batches does not apply"),
    ("seq-len", "--seq-len 128 exceeds the model's 64 positions"),
    ("no-config", "is a folder without config.json"),
    ("no-tokenizer", "give --tokenizer DIR"),
    ("pickled", "holds pickled weights only"),
    ("not-utf8", "is not UTF-8 text (byte 1 is 0xff)"),
    ("big-tokenizer", "tokens but the model's vocab_size is 8"),
    ("calib-text-for-torchvision", "--calib-text applies to a Hugging Face model directory"),
])
def test_user_errors_are_one_line_before_the_model_is_built(case, needle, data, tmp_path, capsys, no_build):
    model, out, extra = str(data / "llama"), tmp_path / "out", []
    if case == "out-safetensors":
        out = tmp_path / "x.safetensors"
    elif case == "out-not-empty":
        out = _folder(tmp_path, "full", {"keep.txt": "mine"})
    elif case == "calib-missing":
        extra = ["--calib-text", str(tmp_path / "missing.txt")]
    elif case == "wanda-without-text":
        extra = ["--pattern", "2:4", "--importance", "wanda"]
    elif case == "input-shape":
        extra = ["--input-shape", "1,8"]
    elif case == "calib-batches":
        extra = ["--calib-batches", "2"]
    elif case == "seq-len":
        extra = ["--seq-len", "128"]
    elif case == "no-config":
        model = str(_folder(tmp_path, "empty", {"README": "x"}))
    elif case == "no-tokenizer":
        model = str(_folder(tmp_path, "bare", {"config.json": (data / "llama" / "config.json").read_text()}))
    elif case == "pickled":
        model = str(_folder(tmp_path, "pickled", {"config.json": (data / "llama" / "config.json").read_text(),
                                                   "pytorch_model.bin": b"\x80\x04"}))
    elif case == "not-utf8":
        extra = ["--eval-text", str(_folder(tmp_path, "texts", {"bad.txt": b"a\xffb"}) / "bad.txt")]
    elif case == "big-tokenizer":
        small = _folder(tmp_path, "small", {})
        llama_config(8).save_pretrained(small)
        make_tokenizer().save_pretrained(small)
        model = str(small)
    elif case == "calib-text-for-torchvision":
        model, out, extra = "resnet18", tmp_path / "r.safetensors", ["--calib-text", str(data / "calib.txt")]
    argv = ["prune", model, "--out", str(out), "--no-progress"]
    if "--pattern" not in extra:
        argv += ["--pattern", "channels"]
    code, _, err = run_cli(argv + extra, capsys)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("sparsekernels prune: error: ") and needle in err[0], err[0]
    assert not (tmp_path / "out").exists()


def test_a_config_that_is_not_a_causal_lm_is_refused(data, tmp_path, capsys):
    folder = _folder(tmp_path, "resnet", {})
    transformers.ResNetConfig(hidden_sizes=[8], depths=[1], embedding_size=8).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    code, _, err = run_cli(["prune", str(folder), "--pattern", "channels", "--seq-len", "8", "--out",
                        str(tmp_path / "o"), "--no-progress"], capsys)
    assert code == 2 and "cannot build a causal language model" in err[0] and "ResNetConfig" in err[0]


def test_a_float_input_to_a_token_model_names_token_ids(tmp_path, capsys, monkeypatch):
    (tmp_path / "token_models.py").write_text(textwrap.dedent("""
        from torch import nn

        def embed():
            return nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 2))
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    code, _, err = run_cli(["prune", "token_models:embed", "--pattern", "channels", "--input-shape", "2,5",
                        "--out", str(tmp_path / "e.safetensors")], capsys)
    assert code == 2 and len(err) == 1
    assert "takes token ids (integers) and was given a float input of shape (2, 5)" in err[0]
    assert "--calib-text" in err[0] and "(set --input-shape)" not in err[0]


def test_a_failed_write_leaves_no_folder(data, tmp_path, capsys, monkeypatch):
    def full_disk(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", full_disk)
    out = tmp_path / "never"
    code, _, err = run_cli(prune(data, out, "--pattern", "channels"), capsys)
    assert code == 1 and "No space left on device" in err[0]
    assert list(tmp_path.iterdir()) == []  # neither --out nor the staging folder


# ------------------------------------------------------------------------------------------------ perplexity


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    tokenizer = make_tokenizer()
    return transformers.LlamaForCausalLM(llama_config(len(tokenizer))).eval(), tokenizer


def test_perplexity_of_one_window_is_the_model_loss(tiny):
    model, tokenizer = tiny
    text = "the model prunes sparse heads and the cat runs"
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    with torch.no_grad():
        loss = model(ids, labels=ids).loss
    assert skhf.perplexity(model, tokenizer, text, seq_len=32) == pytest.approx(math.exp(float(loss)), rel=1e-5)


def test_perplexity_is_padding_aware_and_batch_size_free(tiny):
    model, tokenizer = tiny
    docs = sentences(6, 7).splitlines()
    one = skhf.perplexity(model, tokenizer, docs, seq_len=8, batch_size=1)
    assert skhf.perplexity(model, tokenizer, docs, seq_len=8, batch_size=5) == pytest.approx(one, rel=1e-5)
    stream = " ".join(docs)
    disjoint = skhf.perplexity(model, tokenizer, stream, seq_len=16)
    overlapping = skhf.perplexity(model, tokenizer, stream, seq_len=16, stride=4, batch_size=3)
    assert math.isfinite(disjoint) and math.isfinite(overlapping) and overlapping != disjoint
    assert lm_windows_cover_each_token_once(len(tokenizer(stream)["input_ids"]), 16, 4)


def lm_windows_cover_each_token_once(n: int, seq_len: int, stride: int) -> bool:
    from sparsekernels.huggingface.evaluation import token_windows

    predicted = []
    for window, count in token_windows(list(range(n)), seq_len, stride):
        predicted += window[len(window) - count:]
    return predicted == list(range(1, n))


def test_perplexity_refuses_bad_arguments(tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="expected seq_len <= 64"):
        skhf.perplexity(model, tokenizer, "the cat", seq_len=65)
    with pytest.raises(ValueError, match="expected stride <= seq_len"):
        skhf.perplexity(model, tokenizer, "the cat", seq_len=8, stride=9)
    with pytest.raises(ValueError, match="fewer than 2 tokens"):
        skhf.perplexity(model, tokenizer, "cat", seq_len=8)
    with pytest.raises(TypeError, match="a string or a list of strings"):
        skhf.perplexity(model, tokenizer, 3)
    with pytest.raises(ValueError, match="batch_size to be a positive integer"):
        skhf.perplexity(model, tokenizer, "the cat", batch_size=0)
    assert not model.training and isinstance(model, nn.Module)
