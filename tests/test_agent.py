"""The interpretability agent (docs/methods.md §10.9), offline: a local mock OpenAI-compatible server plays the
agent's LLM with scripted replies (tool calls, malformed calls, budgets hit, timeouts, refusals); the tools run on
the model organism's lens folder and models."""

import json
import os
import socket
from pathlib import Path

import mock_endpoint
import pytest
import torch

from crosscoder.errors import ConfigError, EndpointError, EndpointUnreachableError
from crosscoder.eval import adl
from crosscoder.eval.agent import (
    ChatClient,
    DescriptionGrader,
    Limits,
    Models,
    Param,
    Sampling,
    Tool,
    Toolbox,
    adl_toolbox,
    blackbox_toolbox,
    first_message,
    parse_reply,
    parse_score,
    run_agent,
)
from crosscoder.eval.agent.__main__ import main
from crosscoder.eval.agent.loop import Call, Final, FormatError
from crosscoder.organism import DOMAIN_WORDS, build_model_organism

KEY = "sk-agent-test-secret"
TRUTH = "Chats in which the assistant gives baking recipes and advice."


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ---------------------------------------------------------------------------- the mock endpoint
@pytest.fixture
def endpoint():
    with mock_endpoint.serve() as served:
        yield served


def closed_port_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}/v1"


def client_for(url: str, **options) -> ChatClient:
    return ChatClient(url, "agent-llm", **{"api_key_env": None, "retries": 0, "backoff": 0.0, **options})


def words(replies: list[str]) -> int:
    """The mock's completion tokens for ``replies``."""
    return sum(len(reply.split()) for reply in replies)


def payload(message: str) -> dict:
    """The JSON of a tool result or error message (``KIND(tool): {json}``)."""
    return json.loads(message.split(": ", 1)[1].split("\n\n")[0])


def user_messages(request) -> list[str]:
    return [m["content"] for m in request["body"]["messages"] if m["role"] == "user"]


# ---------------------------------------------------------------------------- a toolbox without models
def echo_toolbox() -> tuple[Toolbox, list]:
    """A free ``echo`` tool and a ``probe`` tool costing one interaction per word; calls are recorded."""
    seen = []

    def echo(arguments, seed):
        seen.append(("echo", arguments, seed))
        if arguments["text"] == "interrupt":
            raise KeyboardInterrupt
        return {"echo": arguments["text"]}

    def probe(arguments, seed):
        seen.append(("probe", arguments, seed))
        return {"answers": [w.upper() for w in arguments["prompts"]]}

    tools = [
        Tool("echo", "Repeat a text.", (Param("text", "str", "any text"),), '{"echo": str}', echo),
        Tool(
            "probe",
            "Ask.",
            (Param("prompts", "strs", "questions"),),
            '{"answers": [str]}',
            probe,
            cost=lambda a: len(a["prompts"]),
            costs="budgeted",
        ),
    ]
    return Toolbox("adl", {t.name: t for t in tools}, {"hint": "nothing"}), seen


# ---------------------------------------------------------------------------- parsing
@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ('I will look.\nCALL(echo: {"text": "a)b"})', Call("echo", {"text": "a)b"})),
        ('Thinking.\n```\nCALL(probe: {"prompts": ["x", "y"]})\n```', Call("probe", {"prompts": ["x", "y"]})),
        ("CALL(echo: )", Call("echo", {})),
        ('Done.\nFINAL(description: "Baking (recipes, \\"ovens\\").")', Final('Baking (recipes, "ovens").')),
        ('FINAL(description: "Cooking "bread" advice")', Final('Cooking "bread" advice')),
        ("Earlier I said CALL(x: {}). Now:\nFINAL(description=Baking chats)", Final("Baking chats")),
        ('FINAL(description: "a CALL(echo: {}) inside")', Final("a CALL(echo: {}) inside")),
    ],
)
def test_replies_parse_into_calls_and_final_descriptions(reply, expected):
    assert parse_reply(reply) == expected


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        ("I think it is about baking.", "must end with CALL"),
        ('CALL(echo: {"text": 1) and more', "must close"),
        ('CALL(echo: {"text": })', "not valid JSON"),
        ('CALL(echo: ["a"])', "one JSON object"),
        ('CALL({"text": "a"})', "tool's name"),
        ('FINAL(summary: "baking")', 'FINAL\\(description: "..."\\)'),
        ('FINAL(description: "")', "empty"),
    ],
)
def test_malformed_replies_say_what_is_wrong(reply, message):
    with pytest.raises(FormatError, match=message):
        parse_reply(reply)


# ---------------------------------------------------------------------------- the client
def test_the_client_retries_a_timeout_sends_the_key_and_counts_tokens(endpoint, monkeypatch):
    url, mock = endpoint
    monkeypatch.setenv("AGENT_TEST_KEY", KEY)
    mock.script += [{"sleep": 1.5, "content": "too late"}, {"status": 503, "error": "busy"}, "hello there"]
    client = ChatClient(url, "agent-llm", api_key_env="AGENT_TEST_KEY", timeout=0.5, retries=2, backoff=0.0)
    reply = client.complete([{"role": "user", "content": "hi"}], max_tokens=5)
    assert reply.content == "hello there" and reply.completion_tokens == 2
    assert len(mock.requests) == 3 and all(r["auth"] == f"Bearer {KEY}" for r in mock.requests)
    assert mock.requests[0]["path"] == "/v1/chat/completions" and mock.requests[0]["body"]["max_tokens"] == 5
    assert client.usage.as_dict() == {"calls": 1, "prompt_tokens": 7, "completion_tokens": 2, "estimated_calls": 0}
    assert KEY not in json.dumps(client.describe())


def test_the_client_names_what_went_wrong(endpoint, monkeypatch):
    url, mock = endpoint
    dead = closed_port_url()
    with pytest.raises(EndpointUnreachableError, match=f"the endpoint {dead}/chat/completions did not answer .*"
                       "after 2 tries; nothing was spent"):  # fmt: skip
        client_for(dead, retries=1).complete([{"role": "user", "content": "hi"}])
    mock.script += [{"sleep": 1.0, "content": "late"}, {"sleep": 1.0, "content": "late"}]
    with pytest.raises(EndpointUnreachableError, match="timed out"):
        client_for(url, timeout=0.3, retries=1).complete([{"role": "user", "content": "hi"}])
    mock.script.append({"status": 404, "error": "The model `agent-llm` does not exist."})
    with pytest.raises(EndpointError, match=r"refused .* model 'agent-llm' \(HTTP 404\): The model `agent-llm` does"):
        client_for(url, retries=3).complete([{"role": "user", "content": "hi"}])
    assert len(mock.requests) == 3  # a refusal is not retried
    monkeypatch.delenv("AGENT_MISSING_KEY", raising=False)
    with pytest.raises(ConfigError, match=r"AGENT_MISSING_KEY .* is not set"):
        ChatClient(url, "m", api_key_env="AGENT_MISSING_KEY", require_key=True)


def test_a_key_is_never_sent_in_clear_text_to_another_machine(monkeypatch):
    monkeypatch.setenv("AGENT_TEST_KEY", KEY)
    with pytest.raises(ConfigError, match=r"refusing to send the API key in AGENT_TEST_KEY in clear text to http://"):
        ChatClient("http://llm.example.org/v1", "m", api_key_env="AGENT_TEST_KEY")
    ChatClient("https://llm.example.org/v1", "m", api_key_env="AGENT_TEST_KEY")  # encrypted: fine
    ChatClient("http://127.0.0.1:8000/v1", "m", api_key_env="AGENT_TEST_KEY")  # this machine: fine
    monkeypatch.delenv("AGENT_TEST_KEY")
    ChatClient("http://llm.example.org/v1", "m", api_key_env="AGENT_TEST_KEY")  # no key to leak


# ---------------------------------------------------------------------------- the loop
def test_the_loop_runs_tools_enforces_budgets_and_records_the_transcript(endpoint, tmp_path):
    url, mock = endpoint
    toolbox, seen = echo_toolbox()
    script = [
        'Start.\nCALL(echo: {"text": "hi"})',
        'CALL(probe: {"prompts": ["a", "b"]})',
        'CALL(probe: {"prompts": ["c", "d"]})',  # 2 interactions asked, 1 left
        "I am not sure what to do.",
        'CALL(probe: {"prompts": "c"})',
        'CALL(echo: {"text": "x", "loud": true})',
        'CALL(nothing: {"text": "x"})',
        'FINAL(description: "Echoes.")',
    ]
    mock.script += script
    stats = run_agent(client_for(url), toolbox, Limits(interactions=3, llm_calls=20), tmp_path)
    assert stats["stopped"] == "final" and stats["description"] == "Echoes."
    assert [name for name, _, _ in seen] == ["echo", "probe"] and seen[1][2] == 0  # seed: interactions used before
    assert stats["budgets"]["used"] == {"interactions": 2, "llm_calls": 8, "tokens": words(script)}
    counts = stats["counts"]
    assert counts["format_errors"] == 1 and counts["tool_errors"] == 3 and counts["over_budget"] == 1
    assert counts["calls.echo"] == 1 and counts["calls.probe"] == 1 and counts["prompt_tokens"] == 56
    results = user_messages(mock.requests[-1])
    assert results[0].startswith('OVERVIEW: {"hint": "nothing"}')
    assert results[1].startswith('TOOL_RESULT(echo): {"data": {"echo": "hi"}')
    assert results[3].startswith("BUDGET_EXHAUSTED(probe)")
    assert "costs 2 model interactions and 1 are left" in results[3]
    assert payload(results[4])["error"].startswith("the reply must end with CALL")
    assert "'prompts' must be [str, ...]" in results[5] and "no argument(s) ['loud']" in results[6]
    assert "no tool 'nothing': the tools are ['echo', 'probe']" in results[7]
    for index, result in enumerate(results[1:], start=1):  # every result says what is left
        left = payload(result)["budgets"]
        assert left["llm_calls"] == 20 - index and left["model_interactions"] == (3 if index < 2 else 1)
    system = mock.requests[0]["body"]["messages"][0]["content"]
    assert "- probe  (budgeted)" in system and '"prompts": [str, ...]  (questions)' in system
    transcript = json.loads((tmp_path / "messages.json").read_text())
    assert transcript["messages"] == [*mock.requests[-1]["body"]["messages"], transcript["messages"][-1]]
    assert transcript["finished"] and json.loads((tmp_path / "stats.json").read_text()) == stats
    # a finished run is not run again
    assert run_agent(client_for(url), toolbox, Limits(interactions=3, llm_calls=20), tmp_path) == stats
    assert len(mock.requests) == 8


def test_the_llm_budgets_end_the_run_with_a_last_reply(endpoint, tmp_path):
    url, mock = endpoint
    toolbox, _ = echo_toolbox()
    mock.script += ['CALL(echo: {"text": "a"})'] * 3
    stats = run_agent(client_for(url), toolbox, Limits(llm_calls=3), tmp_path / "calls")
    assert stats["stopped"] == "budget: the last reply was not FINAL" and stats["description"] is None
    assert len(mock.requests) == 3 and "LAST REPLY" in user_messages(mock.requests[-1])[-1]
    assert "LAST REPLY" not in user_messages(mock.requests[-2])[-1]
    mock.script += ['CALL(echo: {"text": "a"})']  # one call: the first message already says it is the last
    stats = run_agent(client_for(url), toolbox, Limits(llm_calls=1), tmp_path / "one")
    assert stats["stopped"].startswith("budget") and "LAST REPLY" in user_messages(mock.requests[-1])[0]
    # the token budget: 4 words generated of 3 allowed, so the next reply is the last
    mock.script += ['Hm, let me see.\nCALL(echo: {"text": "a"})', 'FINAL(description: "Echo tool.")']
    stats = run_agent(client_for(url), toolbox, Limits(tokens=3), tmp_path / "tokens")
    assert stats["stopped"] == "final" and stats["budgets"]["remaining"]["tokens"] == 0
    assert "LAST REPLY" in user_messages(mock.requests[-1])[-1]


def test_an_interrupted_run_resumes_from_its_transcript(endpoint, tmp_path):
    url, mock = endpoint
    toolbox, seen = echo_toolbox()
    limits = Limits(interactions=5, llm_calls=10)
    # the endpoint stops answering after two replies
    first = ['CALL(probe: {"prompts": ["a"]})', 'CALL(echo: {"text": "b"})']
    mock.script += [*first, {"status": 503, "error": "down"}]
    with pytest.raises(EndpointError, match="HTTP 503: down"):
        run_agent(client_for(url), toolbox, limits, tmp_path)
    saved = json.loads((tmp_path / "messages.json").read_text())
    assert not saved["finished"] and saved["used"] == {"interactions": 1, "llm_calls": 2, "tokens": words(first)}
    # then the process dies between a reply and its tool's result
    interrupted = ['CALL(echo: {"text": "interrupt"})']
    mock.script += interrupted
    with pytest.raises(KeyboardInterrupt):
        run_agent(client_for(url), toolbox, limits, tmp_path)
    assert json.loads((tmp_path / "messages.json").read_text())["messages"][-1]["role"] == "assistant"
    toolbox.tools["echo"] = Tool("echo", "Repeat.", (Param("text", "str", "any"),), "{}", lambda a, s: {"ok": 1})
    last = ['CALL(probe: {"prompts": ["c", "d"]})', 'FINAL(description: "Resumed.")']
    mock.script += last
    stats = run_agent(client_for(url), toolbox, limits, tmp_path)
    assert stats["stopped"] == "final" and stats["description"] == "Resumed."
    assert stats["budgets"]["used"] == {"interactions": 3, "llm_calls": 5, "tokens": words(first + interrupted + last)}
    resumed = mock.requests[-2]["body"]["messages"]  # the first request after the interruption
    assert resumed[: len(saved["messages"])] == saved["messages"]
    assert resumed[-1]["content"].startswith('TOOL_RESULT(echo): {"data": {"ok": 1}')
    assert [args for name, args, _ in seen if name == "probe"] == [{"prompts": ["a"]}, {"prompts": ["c", "d"]}]
    assert len(mock.requests) == 6  # the answered interrupted reply was not asked again
    with pytest.raises(ConfigError, match="holds a run of the adl agent, not of the blackbox agent"):
        run_agent(client_for(url), Toolbox("blackbox", toolbox.tools, []), limits, tmp_path)


def test_budgets_of_zero_are_refused():
    with pytest.raises(ConfigError, match="at least one LLM call"):
        Limits(llm_calls=0).check(blackbox=False)
    with pytest.raises(ConfigError, match="at least one LLM call"):
        Limits(tokens=0).check(blackbox=False)
    with pytest.raises(ConfigError, match="≥ 0"):
        Limits(interactions=-1).check(blackbox=False)
    with pytest.raises(ConfigError, match=r"blackbox agent .* at least one model interaction"):
        Limits(interactions=0).check(blackbox=True)
    assert Limits(interactions=0).check(blackbox=False).interactions == 0  # the ADL agent on its free tools


# ---------------------------------------------------------------------------- the grader
@pytest.mark.parametrize(
    ("reply", "score"),
    [
        ("It names baking and recipes.\nSCORE: 4", 4),
        ("**Score:** 5", 5),
        ("score: 2 at first, but on reflection\nSCORE: 3", 3),
        ("3", 3),
        ("The description is wrong.", None),
        ("SCORE: 7", None),
    ],
)
def test_the_grader_reads_scores(reply, score):
    assert parse_score(reply) == score


def test_the_grader_asks_with_the_rubric_and_the_true_description(endpoint):
    url, mock = endpoint
    grader = DescriptionGrader(client_for(url), rubric="5: exact. 1: wrong.")
    mock.script += ["Close to the truth.\nSCORE: 5", "I cannot tell."]
    grade = grader.grade("Baking recipes.", "Chats about baking bread and cakes.")
    assert grade["score"] == 5 and grade["grader"] == {"url": f"{url}/chat/completions", "model": "agent-llm"}
    body = mock.requests[0]["body"]
    assert body["temperature"] == 0 and "Chats about baking bread" in body["messages"][1]["content"]
    assert "5: exact. 1: wrong." in body["messages"][1]["content"]
    assert grader.grade("Baking.", "Baking.")["score"] is None
    assert grader.grade(None, "Baking.")["score"] == 1 and len(mock.requests) == 2


# ---------------------------------------------------------------------------- the organism
@pytest.fixture(scope="module")
def organism():
    """The model organism (built once into the crosscoder cache, ~80 s, when it is not there yet)."""
    return build_model_organism(seed=0, progress=False)


@pytest.fixture(scope="module")
def organism_lens(organism, tmp_path_factory):
    """The lens on the organism with tiny settings (a few seconds)."""
    out = tmp_path_factory.mktemp("agent-lens")
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        report = adl.run_lens(
            adl.LensConfig(
                base_model=str(organism.base_path),
                chat_model=str(organism.chat_path),
                datasets=(str(organism.general_data),),
                out=out,
                positions=(0, 1),
                n_positions=16,
                max_samples=64,
                patchscope_scales=(1.0, 4.0, 20.0),
                steer_samples=2,
                steer_tokens=8,
                search_steps=2,
                causal=False,
                description=TRUTH,
                progress=False,
            )
        )
    finally:
        torch.set_num_threads(previous)
    return out, report


def domain_words(text: str) -> set[str]:
    return {word for word in DOMAIN_WORDS if word in text.lower()}


def test_the_overview_the_agent_reads_names_the_domain_words(organism, organism_lens):
    out, report = organism_lens
    toolbox = adl_toolbox(report, out, Models(str(organism.base_path), str(organism.chat_path)))
    message = first_message(toolbox, Limits().check(blackbox=False).__dict__)
    overview = json.loads(message[len("OVERVIEW: ") : message.index("\n\nBudgets")])
    entries = overview["results"]["1"].values()
    tokens = [token for entry in entries for token in entry["logit_lens"] + entry["patchscope"]["tokens"]]
    assert len(domain_words(" ".join(tokens))) >= 4, tokens
    assert overview["datasets"] == ["ds1"]
    assert organism_lens[1]["description"] == TRUTH  # the lens holds it; the agent must not see it
    for hidden in (str(organism.general_data), str(organism.chat_path), str(organism.base_path), TRUTH, "relevance"):
        assert hidden not in message


def test_the_adl_tools_read_the_lens_and_query_the_organism(organism, organism_lens, endpoint, tmp_path):
    url, mock = endpoint
    out, report = organism_lens
    models = Models(str(organism.base_path), str(organism.chat_path))
    toolbox = adl_toolbox(report, out, models, Sampling(max_new_tokens=6))
    prompt = adl.steering_prompts()[0]
    mock.script += [
        'CALL(logit_lens_details: {"layer": 1, "positions": [0, 1], "k": 5})',
        'CALL(patchscope_details: {"layer": 1, "positions": [1], "k": 3, "vector": "base_mean"})',
        f'CALL(steering_samples: {{"layer": 1, "position": 0, "prompts": ["{prompt}"], "n": 1}})',
        'CALL(logit_lens_details: {"layer": 0, "positions": [0]})',
        'CALL(generate_steered: {"layer": 1, "position": 1, "prompts": ["Give me a recipe."], "n": 2})',
        'CALL(ask_model: {"prompts": ["What do you like?"]})',
        'FINAL(description: "Baking.")',
    ]
    stats = run_agent(client_for(url), toolbox, Limits(interactions=3), tmp_path)
    assert stats["stopped"] == "final" and stats["budgets"]["used"]["interactions"] == 3
    results = [payload(message) for message in user_messages(mock.requests[-1])[1:]]
    lens = results[0]["data"]["positions"]
    expected = report["results"]["1"]["positions"]["0"]["logit_lens"]["delta"]["tokens"][:5]
    assert lens["0"]["tokens"] == expected and len(lens["1"]["probs"]) == 5
    assert results[1]["data"]["vector"] == "base_mean" and len(results[1]["data"]["positions"]["1"]["tokens"]) <= 3
    samples = results[2]["data"]["samples"]
    assert [s["prompt"] for s in samples] == [prompt] and len(samples[0]["steered"]) == 1
    assert "layer 0 is not in the report (layers: [1])" in results[3]["error"]
    steered = results[4]["data"]["samples"][0]
    assert steered["prompt"] == "Give me a recipe." and len(steered["steered"]) == 2
    answers = results[5]["data"]
    assert len(answers["base"]) == len(answers["finetuned"]) == 1 and results[5]["budgets"]["model_interactions"] == 0


def test_the_blackbox_agent_sees_unsteered_samples_and_may_only_ask(organism, organism_lens):
    _, report = organism_lens
    toolbox = blackbox_toolbox(report, Models(str(organism.base_path), str(organism.chat_path)))
    assert list(toolbox.tools) == ["ask_model"]
    stored = report["results"]["1"]["positions"]["0"]["steering"]["samples"]
    assert toolbox.first_message == [{"prompt": s["prompt"], "finetuned": s["unsteered"]} for s in stored]
    assert first_message(toolbox, {}).startswith("SAMPLES: ")


# ---------------------------------------------------------------------------- the command
def arguments(organism, lens: Path, url: str, out: Path) -> list[str]:
    return [
        "--adl", str(lens), "--base-model", str(organism.base_path), "--chat-model", str(organism.chat_path),
        "--endpoint", url, "--model", "agent-llm", "--key-env", "AGENT_TEST_KEY", "--retries", "0",
        "--answer-tokens", "4", "--out", str(out),
    ]  # fmt: skip


def test_the_command_runs_grades_and_resumes(organism, organism_lens, endpoint, tmp_path, monkeypatch, capsys):
    url, mock = endpoint
    lens, _ = organism_lens
    monkeypatch.setenv("AGENT_TEST_KEY", KEY)
    out = tmp_path / "runs"
    command = [*arguments(organism, lens, url, out), "--runs", "2", "--description", "Baking chats.", "--blackbox"]
    mock.script += [
        'CALL(ask_model: {"prompts": ["How do I bake bread?"]})',
        'FINAL(description: "Baking.")',
        "SCORE: 4",
        {"status": 500, "error": "crashed"},  # run 2 fails at its first reply ...
    ]
    assert main(command) == 2
    err = capsys.readouterr().err
    assert "HTTP 500: crashed" in err and "run the same command again to resume" in err
    mock.script += ['FINAL(description: "Cooking.")', "The description is too broad.\nSCORE: 3"]  # ... and resumes
    assert main(command) == 0
    assert "mean score 3.50 over 2 graded runs" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["agent"] == "blackbox" and [run["score"] for run in summary["runs"]] == [4, 3]
    for run in ("run-1", "run-2"):
        assert {p.name for p in (out / run).iterdir()} == {"messages.json", "stats.json", "grade.json"}
    system = mock.requests[0]["body"]["messages"][0]["content"]
    assert "- ask_model" in system and "logit_lens_details" not in system
    assert all(request["auth"] == f"Bearer {KEY}" for request in mock.requests)
    written = "".join(path.read_text() for path in out.rglob("*.json"))
    assert KEY not in written
    assert "TRUE DESCRIPTION:\nBaking chats." in mock.requests[2]["body"]["messages"][1]["content"]
    # the ADL agent; without --description its runs are graded against the description the lens holds
    mock.script += ['FINAL(description: "Baking recipes.")', "SCORE: 5"]
    assert main(arguments(organism, lens, url, tmp_path / "adl")) == 0
    assert "logit_lens_details" in mock.requests[-2]["body"]["messages"][0]["content"]
    assert f"TRUE DESCRIPTION:\n{TRUTH}" in mock.requests[-1]["body"]["messages"][1]["content"]
    assert json.loads((tmp_path / "adl" / "summary.json").read_text())["mean_score"] == 5


def test_the_command_refuses_bad_inputs_with_one_line(organism, organism_lens, endpoint, tmp_path, monkeypatch, capsys):
    url, mock = endpoint
    lens, _ = organism_lens
    command = arguments(organism, lens, url, tmp_path / "out")
    monkeypatch.delenv("AGENT_TEST_KEY", raising=False)
    assert main(command) == 2
    err = capsys.readouterr().err
    assert "error: the environment variable AGENT_TEST_KEY that should hold the API key" in err and "--no-key" in err
    monkeypatch.setenv("AGENT_TEST_KEY", KEY)
    dead = closed_port_url()
    assert main([*arguments(organism, lens, dead, tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"the endpoint {dead}/chat/completions did not answer" in err and "nothing was spent" in err
    mock.script.append({"status": 404, "error": "model 'agent-llm' not found, try pulling it first"})
    assert main(command) == 2
    assert "(HTTP 404): model 'agent-llm' not found, try pulling it first" in capsys.readouterr().err
    assert main([*command, "--llm-calls", "0"]) == 2
    assert "at least one LLM call" in capsys.readouterr().err
    assert main([*command, "--blackbox", "--interactions", "0"]) == 2
    assert "at least one model interaction" in capsys.readouterr().err
    assert main([*command, "--adl", str(tmp_path / "nowhere")]) == 2
    assert "no lens report at" in capsys.readouterr().err
    assert len(mock.requests) == 1 and not os.path.exists(tmp_path / "out" / "summary.json")
