"""The OpenAI-compatible judge against a fake server on loopback: success, cache, retries, timeouts, bad answers."""

from __future__ import annotations

import time

import pytest

from rrg3d.judge import make_judge
from rrg3d.judge.cache import JudgeCache
from rrg3d.judge.http import OpenAIJudge

REFS = ["Cardiomegaly. Small right pleural effusion.", "Emphysema.", "Normal study."]
CANDS = ["Cardiomegaly.", "Emphysema and a nodule.", "Normal study."]


def _judge(server, tmp_path, **kwargs):
    options = {"timeout": 2.0, "retries": 2, "backoff": 0.01, "concurrency": 2, "cache": tmp_path / "cache.sqlite"}
    options.update(kwargs)
    return OpenAIJudge("judge-model", server.base_url, **options)


def test_scores_then_answers_from_the_cache(completion, fake_server, tmp_path, monkeypatch):
    monkeypatch.setenv("RRG3D_JUDGE_API_KEY", "sk-test-123")
    server = fake_server([(200, completion("Explanation: agrees on most findings.\nScore: 4"), 0)])
    judge = _judge(server, tmp_path)
    results = judge.evaluate(REFS, CANDS, "score")
    assert [r.score for r in results] == [4.0, 4.0, 4.0] and all(r.parse_ok and not r.cached for r in results)
    assert results[0].explanation == "agrees on most findings."
    assert len(server.requests) == 3
    request = server.requests[0]
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["Authorization"] == "Bearer sk-test-123"
    assert request["body"]["model"] == "judge-model" and request["body"]["temperature"] == 0.0
    assert "Score:" in request["body"]["messages"][-1]["content"]

    again = _judge(server, tmp_path).evaluate(REFS, CANDS, "score")  # a new judge, same cache file
    assert [r.score for r in again] == [4.0, 4.0, 4.0] and all(r.cached for r in again)
    assert len(server.requests) == 3  # the server saw no second round
    assert len(JudgeCache(tmp_path / "cache.sqlite")) == 3
    _judge(server, tmp_path).evaluate(REFS[:1], CANDS[:1], "findings_match")  # another prompt is another key
    assert len(server.requests) == 4
    with pytest.warns(FutureWarning, match="deprecated"):  # the old name is the same prompt: the same key
        [alias] = _judge(server, tmp_path).evaluate(REFS[:1], CANDS[:1], "green")
    assert alias.cached and len(server.requests) == 4 and len(JudgeCache(tmp_path / "cache.sqlite")) == 4


def test_retries_server_errors_with_backoff(completion, fake_server, tmp_path):
    server = fake_server([(500, "boom", 0), (502, "bad gateway", 0), (200, completion("Score: 2"), 0)])
    judge = _judge(server, tmp_path, concurrency=1)
    [result] = judge.evaluate(REFS[:1], CANDS[:1])
    assert result.score == 2.0 and result.error is None
    assert len(server.requests) == 3


def test_gives_up_after_the_retries_and_never_caches_errors(fake_server, tmp_path):
    server = fake_server([(500, "still broken", 0)])
    judge = _judge(server, tmp_path, retries=2, concurrency=1)
    [result] = judge.evaluate(REFS[:1], CANDS[:1])
    assert result.score is None and not result.parse_ok
    assert "HTTP 500" in result.error and "after 3 attempts" in result.error
    assert len(server.requests) == 3
    assert len(JudgeCache(tmp_path / "cache.sqlite")) == 0


def test_client_errors_are_not_retried(fake_server, tmp_path):
    server = fake_server([(401, {"error": "bad key"}, 0)])
    [result] = _judge(server, tmp_path).evaluate(REFS[:1], CANDS[:1])
    assert "HTTP 401" in result.error and len(server.requests) == 1


def test_timeouts_are_retried_then_reported(completion, fake_server, tmp_path):
    server = fake_server([(200, completion("Score: 5"), 1.0)])
    judge = _judge(server, tmp_path, timeout=0.2, retries=1, concurrency=1)
    start = time.perf_counter()
    [result] = judge.evaluate(REFS[:1], CANDS[:1])
    assert result.score is None and "timed out" in result.error
    assert len(server.requests) == 2
    assert time.perf_counter() - start < 5


def test_malformed_answers_are_parse_failures_not_crashes(completion, fake_server, tmp_path):
    answers = iter(["I think it is fine.", "Score: 9", "", "Explanation: ok\nScore: 3/5"])
    server = fake_server([(200, lambda body: completion(next(answers)), 0)])
    judge = _judge(server, tmp_path, concurrency=1)
    results = judge.evaluate(["r1", "r2", "r3", "r4"], ["c1", "c2", "c3", "c4"])
    assert [r.parse_ok for r in results] == [False, False, False, True]
    assert results[0].parse_error == "no 'Score: n' in the answer" and results[0].raw == "I think it is fine."
    assert "outside 1-5" in results[1].parse_error
    assert results[3].score == 3.0


def test_a_body_that_is_not_a_chat_completion_is_an_error(fake_server, tmp_path):
    server = fake_server([(200, b"<html>proxy error</html>", 0), (200, {"choices": []}, 0)])
    judge = _judge(server, tmp_path, concurrency=1, retries=0)
    results = judge.evaluate(["a", "b"], ["c", "d"])
    assert all(r.error and "malformed chat completion" in r.error for r in results)


def test_concurrency_is_limited(completion, fake_server, tmp_path):
    server = fake_server([(200, completion("Score: 3"), 0.15)])
    judge = _judge(server, tmp_path, concurrency=2, cache=None)
    judge.evaluate([f"r{i}" for i in range(6)], [f"c{i}" for i in range(6)])
    assert len(server.requests) == 6 and server.max_in_flight == 2


def test_findings_match_prompt_counts(completion, fake_server, tmp_path):
    answer = ("[Clinically significant errors]\n(a) false finding: 1\n(b) missing finding: 2\n(c) wrong location: 0\n"
              "(d) wrong severity: 0\n(e) false comparison: 0\n(f) missing comparison: 0\n"
              "[Clinically insignificant errors]\n(a) false finding: 1\n(b) missing finding: 0\n(c) wrong location: 0\n"
              "(d) wrong severity: 0\n(e) false comparison: 0\n(f) missing comparison: 0\n[Matched findings]\n3\n")
    server = fake_server([(200, completion(answer), 0)])
    [result] = _judge(server, tmp_path).evaluate(REFS[:1], CANDS[:1], "findings_match")
    assert result.score == pytest.approx(3 / (3 + 3))
    assert result.counts["significant"]["b"] == 2 and result.counts["insignificant"]["a"] == 1
    assert result.counts["matched"] == 3 and result.counts["missing"] == []


def test_make_judge_specs(tmp_path, stub_labeler):
    judge = make_judge("http:gpt-4o-mini@http://127.0.0.1:9/v1", cache=tmp_path / "c.sqlite", retries=0)
    assert isinstance(judge, OpenAIJudge) and judge.url == "http://127.0.0.1:9/v1/chat/completions"
    assert judge.model == "gpt-4o-mini"
    assert make_judge("http:org/model@v2@https://example.org/api", cache=False).model == "org/model@v2"
    assert make_judge("rule", labeler=stub_labeler).id.startswith("rule:")
    from rrg3d.judge.base import JudgeError

    with pytest.raises(JudgeError, match="expected http:MODEL@BASE_URL"):
        make_judge("http:no-url", cache=False)
    with pytest.raises(JudgeError, match="unknown judge spec"):
        make_judge("gpt4", cache=False)
    [unreachable] = make_judge("http:m@http://127.0.0.1:9/v1", cache=False, retries=0).evaluate(["a"], ["b"])
    assert "cannot reach" in unreachable.error
