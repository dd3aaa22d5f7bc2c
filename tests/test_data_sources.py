"""Several ``--data`` sources: a command-line list, a YAML list of mappings with their own fields, split and
size, shuffled together by seed; the dry run and every bad-row error name the source."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import yaml
from userfeatures import pair_rows, save_tiny_model, train_flags, write_jsonl

from qlora_orpo.cli import main
from qlora_orpo.config import OrpoConfig
from qlora_orpo.core.errors import ConfigError, DataError
from qlora_orpo.data.mixture import load_run_data, load_sources, parts_of, sources_of

OTHER = ("question", "good", "bad")  # the second source's column names


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    second = pair_rows(6, seed=1, fields=OTHER)
    second[2] = {"question": "q", "good": "fine"}  # row 3: no rejected column
    return {"root": root, "first": write_jsonl(root / "first.jsonl", pair_rows(10, seed=0)),
            "second": write_jsonl(root / "second.jsonl", second)}


def mapping_config(files, **extra) -> OrpoConfig:
    second = {"path": str(files["second"]), "prompt_field": "question", "chosen_field": "good", "rejected_field": "bad"}
    return OrpoConfig(data=[str(files["first"]), {**second, **extra}], eval_fraction=0.0)


def test_two_sources_with_their_own_field_names_are_mixed_and_the_bad_row_names_its_source(files):
    data = load_run_data(mapping_config(files)).data
    assert len(data.pairs) == 10 + 5 and data.total_rows == 16
    assert {p.source for p in data.pairs} == {str(files["first"]), str(files["second"])}
    assert [s.describe() for s in data.skipped] == [f"{files['second']}, row 3, field 'bad': missing field"]
    assert [len(part.pairs) for part in parts_of(data)] == [10, 5]
    firsts = [p.source == str(files["first"]) for p in data.pairs]
    assert firsts != sorted(firsts, reverse=True)  # shuffled together, not one file after the other
    with pytest.raises(DataError, match=rf"^{files['second']}, row 3, field 'bad': missing field$"):
        load_run_data(replace(mapping_config(files), strict=True))


def test_the_mixture_is_decided_by_the_seed(files):
    def order(seed):
        return [(p.source, p.row) for p in load_run_data(replace(mapping_config(files), seed=seed)).data.pairs]
    assert order(1) == order(1) and order(1) != order(2)


def test_max_rows_and_split_are_per_source(files, tmp_path):
    data = load_run_data(mapping_config(files, max_rows=2)).data
    assert [part.total_rows for part in parts_of(data)] == [10, 2]
    datasets = pytest.importorskip("datasets")
    rows = pair_rows(4, seed=3)
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows[:3])}
                         ).save_to_disk(str(tmp_path / "saved"))
    cfg = OrpoConfig(data=[str(files["first"]), {"path": str(tmp_path / "saved"), "split": "test"}])
    assert [len(part.pairs) for part in parts_of(load_sources(sources_of(cfg)))] == [10, 3]


def test_a_source_mapping_is_checked_when_the_config_is_read(files, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"data": [{"path": "a.jsonl", "chosen": "x"}]}))
    with pytest.raises(ConfigError, match=r"data\[1\]: unknown key 'chosen'; a source takes path, prompt_field"):
        OrpoConfig.from_file(path)
    with pytest.raises(ConfigError, match=r"data\[2\].max_rows: expected an integer >= 0"):
        OrpoConfig(data=["a.jsonl", {"path": "b.jsonl", "max_rows": -1}])
    assert OrpoConfig(data=["one.jsonl"]).data == "one.jsonl"  # one source is recorded as before


def test_cli_list_and_yaml_mappings_reach_the_dry_run_which_names_each_source(files, capsys):
    model = save_tiny_model(files["root"] / "model")
    flags = train_flags(model, files["first"], files["root"] / "runs")
    i = flags.index("--data")
    flags[i:i + 2] = ["--data", str(files["first"]), str(files["first"])]  # the same file twice, as a list
    assert main(["dry-run", *flags]) == 0
    out = capsys.readouterr().out
    assert f"data:      {files['first']} + {files['first']}" in out and "20 pairs kept" in out
    config = files["root"] / "mix.yaml"
    config.write_text(yaml.safe_dump({"data": mapping_config(files).data}))
    del flags[i:i + 3]
    assert main(["dry-run", "--config", str(config), *flags]) == 0
    out = capsys.readouterr().out
    assert f"  source   {files['first']}: prompt/chosen/rejected, 10 rows read, 10 pairs kept, 0 skipped" in out
    assert f"  source   {files['second']}: prompt/chosen/rejected, 6 rows read, 5 pairs kept, 1 skipped" in out
    assert f"e.g.   {files['second']}, row 3, field 'bad': missing field" in out
    assert main(["train", "--config", str(config), *flags, "--max-steps", "1", "--save-every", "0",
                 "--eval-fraction", "0"]) == 0
    recorded = yaml.safe_load((files["root"] / "runs" / "t" / "config.yaml").read_text())
    assert recorded["data"][1]["prompt_field"] == "question"  # the resolved config keeps the mapping
    adapter = files["root"] / "runs" / "t" / "adapter"
    card = (adapter / "README.md").read_text()
    # The card names each source by its file name; the local path stays in the record beside it.
    assert "second.jsonl" in card and str(files["root"]) not in card
    local = json.loads(adapter.with_name("adapter.local.json").read_text())
    assert local["data"]["data"][1]["path"] == str(files["second"])
