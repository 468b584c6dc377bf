"""The local causal-LM judge on a tiny randomly initialised Llama (built in the test), and the packaged default."""

from __future__ import annotations

import pytest

from rrg3d.judge.local import LocalLMJudge, packaged_smollm2
from rrg3d.judge.prompts import build_prompt


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    path = tmp_path_factory.mktemp("tiny-llama")
    words = set(build_prompt("score", "heart normal", "heart enlarged").split())
    words |= {"Explanation:", "Score:", "1", "2", "3", "4", "5", "the", "report", "is", "fine"}
    vocab = {"[UNK]": 0, "[PAD]": 1, "<s>": 2, "</s>": 3}
    for word in sorted(words):
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]",
                                                     bos_token="<s>", eos_token="</s>")
    tokenizer.save_pretrained(path)
    config = transformers.LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
                                      bos_token_id=2, eos_token_id=3, pad_token_id=1)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return path


def test_tiny_model_judges_without_crashing_and_caches(tiny_model, tmp_path):
    judge = LocalLMJudge(tiny_model, max_new_tokens=6, cache=tmp_path / "cache.sqlite")
    assert judge.id.startswith(f"local:{tiny_model}")
    results = judge.evaluate(["heart normal", "heart enlarged"], ["heart enlarged", "heart enlarged"], "score")
    assert len(results) == 2 and judge.calls == 2
    for result in results:
        assert result.error is None and isinstance(result.raw, str)
        assert result.parse_ok == (result.score is not None)  # random weights: a parse failure, recorded
        if not result.parse_ok:
            assert result.parse_error
    again = judge.evaluate(["heart normal", "heart enlarged"], ["heart enlarged", "heart enlarged"], "score")
    assert judge.calls == 2 and all(r.cached for r in again)
    assert [r.raw for r in again] == [r.raw for r in results]  # greedy decoding is deterministic


def test_an_unloadable_model_is_a_recorded_error(tmp_path):
    (tmp_path / "broken").mkdir()
    [result] = LocalLMJudge(tmp_path / "broken").evaluate(["a"], ["b"])
    assert result.score is None and "cannot load the judge model" in result.error


@pytest.mark.slow
def test_packaged_smollm2_default_judge(tmp_path):
    pytest.importorskip("gguf")
    try:
        packaged_smollm2()
    except Exception as exc:
        pytest.skip(str(exc))
    judge = LocalLMJudge(None, max_new_tokens=24, cache=None)
    [result] = judge.evaluate(["Cardiomegaly."], ["The heart is enlarged."], "score")
    assert result.error is None and isinstance(result.raw, str) and result.raw.strip()
