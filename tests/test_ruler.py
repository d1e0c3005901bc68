"""`sinklora eval ruler`: every generated answer is recoverable from its own prompt (parsed back, not
compared with the generator's bookkeeping), lengths land just under the target in tokens, samples are
deterministic per seed, RULER's scoring on hand-made outputs, and the command end to end on a tiny model
(full cache, H2O at 50%, an adapter)."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from conftest import tiny_llama, tiny_tokenizer

from sinklora.config import ConfigError, load_config
from sinklora.eval.ruler import match_all, match_part, postprocess, string_match_all, string_match_part, summarize
from sinklora.eval.ruler_haystacks import Resources, play_passages
from sinklora.eval.ruler_tasks import TASKS, RulerOptions, fwe_min_words, generate_samples, make_sample, zeta

SPEAKERS = ["Alda.", "Bertram.", "Cleon.", "First Guard.", "Dorcas."]


def fake_play(seed: int, speeches: int = 80) -> str:
    """A play in the Gutenberg layout of the books corpus: headings, labels above speeches, stage directions."""
    rng = __import__("random").Random(seed)
    words = "moon sword crown river night honour father gold storm letter grave heart".split()
    blocks = [f"THE TRAGEDY OF PLAY {seed}", "ACT I.", "Scene I. A hall."]
    for i in range(speeches):
        if i % 17 == 5:
            blocks.append(f"[Enter {rng.choice(SPEAKERS)[:-1]}.]")
        if i % 29 == 28:
            blocks.append(f"SCENE {i // 29 + 2}. Another room.")
        lines = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 9))) + f" {seed} {i} {j}."
                 for j in range(rng.randint(1, 4))]
        blocks.append("\n".join([rng.choice(SPEAKERS)] + lines))
    return "\n\n".join(blocks)


@pytest.fixture(scope="module")
def res() -> Resources:
    return Resources(texts=[fake_play(s) for s in range(6)])


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def question_part(prompt: str, marker: str) -> str:
    return prompt.rsplit(marker, 1)[1]


def check_niah(sample) -> None:
    needles = re.findall(r"One of the special magic \w+ for (\S+) is: (\S+)\.(?=\s|$)", sample.prompt)
    question = question_part(sample.prompt, "\nWhat ")
    asked = {k for k, _ in needles if k in question}
    assert asked, "no needle key is asked about"
    expected = [v for k, v in needles if k in asked]
    assert sorted(expected) == sorted(sample.answers)


def check_vt(sample) -> None:
    assign = dict(re.findall(r"VAR (\w+) = ((?:VAR )?\w+)", sample.prompt))

    def resolve(name: str) -> str:
        seen = 0
        while assign[name].startswith("VAR "):
            name, seen = assign[name][4:], seen + 1
            assert seen < 100
        return assign[name]

    value = re.findall(r"assigned the value (\d+) in the text above", sample.prompt)[-1]
    assert sorted(v for v in assign if resolve(v) == value) == sorted(sample.answers)


def check_cwe(sample, num: int = 10) -> None:
    listing = question_part(sample.prompt, "Memorize the ones that appear most often.\n").split("\nQuestion:")[0]
    counts = Counter(re.findall(r"\d+\. ([a-z]+)", listing))
    ranked = counts.most_common()
    assert ranked[num - 1][1] > ranked[num][1]  # the top words are strictly more frequent
    assert {w for w, _ in ranked[:num]} == set(sample.answers)


def check_fwe(sample) -> None:
    text = question_part(sample.prompt, "three most frequently appeared coded words. ").split("\nQuestion:")[0]
    ranked = [(w, c) for w, c in Counter(text.split()).most_common() if w != "..."]
    assert ranked[2][1] > ranked[3][1]
    assert [w for w, _ in ranked[:3]] == sample.answers


def check_qa(sample) -> None:
    line = re.search(r'speaks the line "(.+)"\?', sample.prompt).group(1)
    assert sample.prompt.count(line) == 2  # once in its passage, once in the question
    block = sample.prompt[:sample.prompt.index(line)].rsplit("\n\n", 1)[1]  # the speech holding the line
    label = re.sub(r"^Document \d+:\n", "", block).split("\n")[0]
    assert label == sample.answers[0] + "."


CHECKS = {"niah": check_niah, "variable_tracking": check_vt, "common_words_extraction": check_cwe,
          "freq_words_extraction": check_fwe, "qa": check_qa}


@pytest.mark.parametrize("task", list(TASKS))
@pytest.mark.parametrize("length", [2048, 8192])  # byte tokens: ~4x a real tokenizer's
def test_every_answer_is_recoverable_from_its_haystack(task, length, tok, res):
    for index in range(3):
        sample = make_sample(tok, task, length, index, seed=1, opts=RulerOptions(chat=index != 1), res=res)
        CHECKS[TASKS[task]["family"]](sample)


def test_vt_with_several_chains_and_hops(tok, res):
    opts = RulerOptions(vt_chains=3, vt_hops=6)
    sample = make_sample(tok, "vt", 4096, 0, opts=opts, res=res)
    assert len(sample.answers) == 7
    check_vt(sample)
    assert len(re.findall(r"VAR \w+ = \d+", sample.prompt)) == 3 + 1  # 3 chains + the in-context example


@pytest.mark.parametrize("chat", [True, False])
def test_lengths_land_just_under_the_target(tok, res, chat):
    target = 8192  # cwe switches to RULER's long-list repeats (30/3) from 4096
    for task in TASKS:
        sample = make_sample(tok, task, target, 0, opts=RulerOptions(chat=chat), res=res)
        total = sample.prompt_tokens + sample.tokens_to_generate
        assert sample.input_ids == list(tok(sample.prompt, add_special_tokens=not chat).input_ids)
        # one haystack unit (a noise sentence, a UUID needle: ~120 byte-tokens) is the granularity
        assert target - 130 <= total <= target, (task, total)


def test_a_length_too_short_for_the_template_is_refused(tok, res):
    with pytest.raises(ValueError, match="length=300: task 'cwe' needs more than"):
        make_sample(tok, "cwe", 300, 0, res=res)


def test_generation_is_deterministic_per_seed(tok, res):
    tasks = ["niah_multikey_2", "niah_multivalue", "vt", "cwe", "fwe", "qa"]
    a = generate_samples(tok, tasks, [2048], 2, seed=5, res=res, progress=False)
    b = generate_samples(tok, tasks, [2048], 2, seed=5, res=res, progress=False)
    assert [(s.prompt, s.answers) for s in a] == [(s.prompt, s.answers) for s in b]
    alone = make_sample(tok, "vt", 2048, 1, seed=5, res=res)  # a sample rebuilt on its own is the same
    assert (alone.prompt, alone.answers) == next((s.prompt, s.answers) for s in a if s.task == "vt" and s.index == 1)
    c = generate_samples(tok, tasks, [2048], 2, seed=6, res=res, progress=False)
    assert all(x.prompt != y.prompt for x, y in zip(a, c))
    assert a[0].prompt != a[1].prompt  # samples of one cell differ


def test_ruler_scoring_on_hand_made_outputs():
    assert postprocess("  7 \x00 8\x1f ") == "7 \n 8"
    assert match_all("The numbers are 123 and 456.", ["123", "456", "789", "000"]) == 0.5
    assert match_all("KEY-word", ["key-WORD"]) == 1.0  # case-insensitive substring
    assert match_part("It is Laertes.", ["Laer", "Ophelia"]) == 1.0
    assert match_part("Polonius", ["Laer"]) == 0.0
    # RULER's set metrics: (2/3 + 0) / 2 and (1 + 0) / 2
    assert string_match_all(["a b", "z"], [["a", "b", "c"], ["y"]]) == pytest.approx(1 / 3)
    assert string_match_part(["a", "z"], [["a", "b"], ["y"]]) == 0.5
    records = [{"cache": "full", "task": "vt", "length": 512, "score": s, "prompt_tokens": 480,
                "cache_stats": {"kept_tokens": 500, "seen_tokens": 500}} for s in (1.0, 0.5)]
    records += [{"cache": "full", "task": "qa", "length": 512, "score": 0.0, "prompt_tokens": 470,
                 "cache_stats": {"kept_tokens": 500, "seen_tokens": 500}}]
    (summary,) = summarize(records, ["vt", "qa"], [512], ["full"])
    assert summary["scores"] == {"vt": {"512": 75.0}, "qa": {"512": 0.0}}
    assert summary["average"] == 37.5 and summary["kv_kept"] == 1.0
    assert summary["prompt_tokens"]["512"] == pytest.approx((480 + 480 + 470) / 3)


def test_zeta_and_the_smallest_fwe_haystack():
    assert zeta(2.0) == pytest.approx(math.pi**2 / 6, abs=1e-9)
    assert zeta(4.0) == pytest.approx(math.pi**4 / 90, abs=1e-9)
    n = fwe_min_words(2.0)
    counts = [int(n * k**-2.0 / zeta(2.0)) for k in range(1, 6)]
    assert counts[1] > counts[2] > counts[3] > counts[4]


def test_play_passages_keep_speakers_with_their_lines():
    text = ("TITLE\n\nACT I.\n\nScene I. A hall.\n\nAlda.\nFirst line here of mine.\nSecond line.\n\n"
            "[Enter Cleon.]\n\nStill Alda speaking after the entrance.\n\nCleon.\nA reply from Cleon now.\n\n"
            "ACT II.\n\nDorcas.\nLonely speech of Dorcas here.\n\nAlda.\nAnswer to Dorcas.")
    passages = play_passages([text])
    assert [p.lines for p in passages] == [
        [("Alda.", "First line here of mine."), ("Alda.", "Second line."), ("Cleon.", "A reply from Cleon now.")],
        [("Dorcas.", "Lonely speech of Dorcas here."), ("Alda.", "Answer to Dorcas.")]]
    assert "Still Alda speaking" in passages[0].text and "ACT" not in passages[0].text + passages[1].text
    with pytest.raises(ValueError, match="task 'qa' needs plays"):
        Resources(texts=["Only prose. No speakers at all."]).questions


def test_command_modules_import_without_torch():
    code = ("import sys, sinklora.commands.eval_ruler, sinklora.commands.eval_longbench; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent)


def _cfg(**over):
    from sinklora.commands.eval_ruler import RulerConfig

    return load_config(RulerConfig, overrides=[f"{k}={v}" for k, v in over.items()])


def test_config_errors_name_field_value_and_fix():
    with pytest.raises(ConfigError) as err:
        _cfg(tasks="niah_single_1,needle", lengths="128", cache="h2o", caches="h2o:0.2", fwe_alpha=1.0)
    text = str(err.value)
    assert "tasks=['niah_single_1', 'needle']: choose from" in text
    assert "lengths=[128]: give lengths >= 256" in text
    assert "give either cache/budget (one setting) or caches (several)" in text
    assert "fwe_alpha=1.0: must be > 1" in text
    with pytest.raises(ConfigError, match="policy 'h2o': budget is required"):
        _cfg(cache="h2o")
    with pytest.raises(ConfigError, match="caches entry 'h2o@2.5'"):
        _cfg(caches="full,h2o:2.5")
    assert [s.name for s in _cfg(caches="full,h2o:0.5,snapkv:20%").cache_settings()] == ["full", "h2o@0.5",
                                                                                      "snapkv@20%"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("ruler")
    tiny_llama(seed=1, max_position_embeddings=4096).save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    peft = get_peft_model(tiny_llama(seed=1, max_position_embeddings=4096),
                          LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft.save_pretrained(root / "adapter")
    (root / "plays").mkdir()
    for s in range(4):
        (root / "plays" / f"play{s}.txt").write_text(fake_play(s))
    return root




def test_command_end_to_end_full_and_h2o(assets, tmp_path, one_thread):
    from sinklora.cli import main

    out = tmp_path / "run"
    tasks = "niah_single_1,niah_single_2,vt,fwe,qa"
    assert main(["eval", "ruler", f"model={assets / 'model'}", f"source={assets / 'plays'}", "split=all",
                 f"tasks={tasks}", "lengths=1800,2400", "samples=2", "caches=full,h2o:0.5", "max_new_tokens=8",
                 f"output_dir={out}"]) == 0
    result = json.loads((out / "results.json").read_text())
    assert [s["cache"] for s in result["summary"]] == ["full", "h2o@0.5"]
    full, h2o = result["summary"]
    assert full["kv_kept"] == 1.0 and 0.4 < h2o["kv_kept"] < 0.6
    assert set(full["scores"]) == set(tasks.split(",")) and set(full["scores"]["vt"]) == {"1800", "2400"}
    assert all(0 <= v <= 100 for s in result["summary"] for row in s["scores"].values() for v in row.values())
    rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 5 * 2 * 2 * 2 and {r["cache"] for r in rows} == {"full", "h2o@0.5"}
    assert all(r["prompt_tokens"] <= r["length"] - 30 for r in rows)
    table = (out / "ruler.md").read_text()
    assert "### cache h2o@0.5" in table and "### score vs compression" in table
    assert (out / "ruler.png").stat().st_size > 0 and (out / "config.yaml").is_file()


def test_command_single_cache_with_an_adapter(assets, tmp_path, one_thread):
    from sinklora.commands.eval_ruler import main

    cfg = _cfg(model=assets / "model", adapter=assets / "adapter", tasks="niah_single_1,cwe", lengths=2048,
               samples=1, cache="h2o", budget=0.5, max_new_tokens=4, output_dir=tmp_path / "a", save_prompts="true")
    assert main(cfg) == 0
    result = json.loads((tmp_path / "a" / "results.json").read_text())
    assert result["metadata"]["adapter"] == str(assets / "adapter") and result["metadata"]["model_info"]["peft"]
    assert [s["cache"] for s in result["summary"]] == ["h2o@0.5"]
    samples = [json.loads(x) for x in (tmp_path / "a" / "samples.jsonl").read_text().splitlines()]
    assert [s["task"] for s in samples] == ["niah_single_1", "cwe"] and all(s["answers"] for s in samples)
