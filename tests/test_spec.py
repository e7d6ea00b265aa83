"""Search-space YAML loading: casting, smoke merge, and a corpus of bad files with their errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import REPO, tiny_copying, write_space

from study.errors import ConfigError
from study.spec import Range, load_spec, space_files

BAD_SPACES = sorted((Path(__file__).parent / "bad_spaces").glob("*.yaml"))
SEARCH_SPACES = sorted((REPO / "search_spaces").rglob("*.yaml"))


def expected_error(path: Path) -> str:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# error: "), f"{path.name}: first line must be '# error: ...'"
    return first.removeprefix("# error: ")


@pytest.mark.parametrize("path", BAD_SPACES, ids=lambda p: p.stem)
def test_bad_space_gives_its_one_line_error(path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_spec(path)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    assert expected_error(path) in message


def test_bad_corpus_is_not_empty() -> None:
    assert len(BAD_SPACES) >= 30


@pytest.mark.parametrize("path", SEARCH_SPACES, ids=lambda p: p.stem)
def test_shipped_spaces_are_valid_with_and_without_smoke(path: Path) -> None:
    full, smoke = load_spec(path), load_spec(path, smoke=True)
    assert full.name == smoke.name == path.stem
    assert smoke.smoke and not full.smoke
    assert full.spec_hash() != smoke.spec_hash() or full.raw == smoke.raw


def test_paper_has_one_space_per_figure_2_to_8() -> None:
    paper = (REPO / "search_spaces" / "paper").glob("*")
    figures = sorted({p.name.split("_")[0] for p in paper})  # Fig. 5 has a file per panel
    assert figures == [f"fig{n}" for n in range(2, 9)]


def test_yaml_traps_are_cast(tmp_path: Path) -> None:
    text = """
task: {name: copying, T: 10}
fixed: {lr: 1e-4, clip_norm: null, iterations: 1e3, anneal_last: null}
scientific: {p_detach: ['0.25', 5e-1], method: [h_detach]}
"""
    path = tmp_path / "traps.yaml"
    path.write_text(text)
    spec = load_spec(path)
    assert spec.fixed["lr"] == pytest.approx(1e-4) and isinstance(spec.fixed["lr"], float)
    assert spec.fixed["clip_norm"] is None
    assert spec.fixed["iterations"] == 1000 and isinstance(spec.fixed["iterations"], int)
    assert spec.scientific["p_detach"] == [0.25, 0.5]


def test_integers_are_taken_exactly_beyond_a_floats_precision(tmp_path: Path) -> None:
    # Read through float(), the two seeds were one (2^53 + 1 rounds to 2^53): "lists a seed twice".
    seeds = "[0, 9007199254740993, 9007199254740992]"
    text = f"task: {{name: copying, T: 10}}\nreplicates: {{seeds: {seeds}}}\n"
    path = tmp_path / "big.yaml"
    path.write_text(text)
    assert load_spec(path).seeds == (0, 9007199254740993, 9007199254740992)


def test_sections_roles_and_defaults(tmp_path: Path) -> None:
    spec = load_spec(
        write_space(
            tmp_path,
            "roles",
            {
                "task": {"name": "copying", "T": 10},
                "model": {"hidden_size": 32},
                "fixed": {"lr": 1.0e-3, "p_detach": 0.5},
                "scientific": {"method": ["none", "h_detach"]},
                "nuisance": {"batch_size": [50, 100]},
            },
        )
    )
    assert spec.name == "roles"
    assert spec.task == "copying" and spec.task_options == {"T": 10}
    assert spec.fixed == {"hidden_size": 32, "lr": 1.0e-3, "p_detach": 0.5}
    assert spec.seeds == (0,)
    assert spec.search.searcher == "grid" and spec.search.metric == "val/accuracy"
    assert spec.target is None
    assert spec.role_of("method") == "scientific"
    assert spec.role_of("batch_size") == "nuisance"
    assert spec.role_of("lr") == spec.role_of("clip_norm") == "fixed"


def test_ranges_and_task_option_axes(tmp_path: Path) -> None:
    spec = load_spec(
        write_space(
            tmp_path,
            "ranges",
            {
                "task": {"name": "copying"},
                "scientific": {"T": [10, 20]},
                "nuisance": {"lr": {"min": "1e-4", "max": 1.0e-2, "scaling": "log"}},
                "search": {"searcher": "optuna", "samples_per_cell": 3, "seed": 7},
                "replicates": {"seeds": [3, 5]},
            },
        )
    )
    assert spec.nuisance["lr"] == Range(1e-4, 1e-2, "log")
    assert spec.scientific["T"] == [10, 20]
    assert spec.seeds == (3, 5)


def test_smoke_overrides_merge_section_by_section(tmp_path: Path) -> None:
    path = write_space(
        tmp_path,
        "merge",
        tiny_copying(
            smoke={
                "fixed": {"iterations": 2, "eval_every": 2},
                "replicates": {"seeds": 1},
                "target": 0.5,
            }
        ),
    )
    full, smoke = load_spec(path), load_spec(path, smoke=True)
    assert full.fixed["iterations"] == 20 and smoke.fixed["iterations"] == 2
    assert smoke.fixed["lr"] == full.fixed["lr"]  # untouched keys of a merged section stay
    assert full.seeds == (0, 1) and smoke.seeds == (0,)
    assert smoke.target == 0.5 and full.target is None
    assert "smoke" not in full.raw and "smoke" not in smoke.raw
    assert full.spec_hash() != smoke.spec_hash()
    assert load_spec(path).spec_hash() == full.spec_hash()


def test_missing_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.yaml: no such file$"):
        load_spec(tmp_path / "nope.yaml")


def test_pack_defaults_to_one_and_works_with_grid_and_random(tmp_path: Path) -> None:
    assert load_spec(write_space(tmp_path, "solo", tiny_copying())).resources.pack == 1
    body = tiny_copying(
        nuisance={"lr": {"min": 1.0e-3, "max": 1.0e-2}},
        search={"searcher": "random", "samples_per_cell": 2},
        resources={"pack": "4"},
    )
    assert load_spec(write_space(tmp_path, "random", body)).resources.pack == 4


def test_pack_auto_is_allowed_with_optuna_a_word_is_not(tmp_path: Path) -> None:
    body = tiny_copying(
        nuisance={"lr": {"min": 1.0e-3, "max": 1.0e-2}},
        search={"searcher": "optuna", "samples_per_cell": 2},
        resources={"pack": "auto"},
    )
    assert load_spec(write_space(tmp_path, "optuna", body)).resources.pack == "auto"
    path = write_space(tmp_path, "many", tiny_copying(resources={"pack": "many"}))
    with pytest.raises(ConfigError) as error:
        load_spec(path)
    assert str(error.value) == (
        f"{path}: field resources.pack: must be an integer >= 1 or auto, got 'many'"
    )


@pytest.mark.parametrize(
    "data",
    [b"task: {name: copying}\n# caf\xff\n", "task: {name: copying}\n".encode("utf-16")],
    ids=["stray_0xff", "utf16_bom"],
)
def test_non_utf8_file_is_one_line(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "latin.yaml"
    path.write_bytes(data)
    with pytest.raises(ConfigError) as caught:
        load_spec(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: must be UTF-8 text, found byte 0xff")
    assert "\n" not in message


def test_utf8_bom_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "bom.yaml"
    path.write_bytes("task: {name: copying}\n".encode("utf-8-sig"))
    assert load_spec(path).task == "copying"


def test_yaml_merge_keys_are_not_duplicates(tmp_path: Path) -> None:
    path = tmp_path / "merge.yaml"
    path.write_text("task: {name: copying}\nfixed: {<<: {lr: 0.1, clip_norm: 2}, lr: 0.2}\n")
    assert load_spec(path).fixed == {"lr": 0.2, "clip_norm": 2.0}


@pytest.mark.parametrize(
    "extra,has",
    [
        ({}, "no smoke section"),
        ({"smoke": None}, "no smoke section"),
        ({"smoke": {}}, "an empty smoke section"),
    ],
    ids=["absent", "null", "empty"],
)
def test_smoke_flag_needs_a_smoke_section(
    tmp_path: Path, extra: dict[str, None | dict[str, object]], has: str
) -> None:
    path = write_space(tmp_path, "no_smoke", {**tiny_copying(), **extra})
    assert not load_spec(path).smoke  # the full study is fine
    expected = f"{path}: --smoke asks for the smoke variant, but the file has {has}"
    with pytest.raises(ConfigError) as caught:
        load_spec(path, smoke=True)
    assert str(caught.value) == expected


@pytest.mark.parametrize("given", ["", "."])
def test_empty_path_says_no_file_given(given: str) -> None:
    with pytest.raises(ConfigError, match=r"^no search space file given \(the path is empty"):
        load_spec(Path(given))
    with pytest.raises(ConfigError, match=r"^no search space file given"):
        load_spec(given)


def test_space_files_expand_a_folder_by_name_and_count_each_file_once(tmp_path: Path) -> None:
    for name in ("b.yaml", "a.yml", "notes.txt"):
        (tmp_path / name).write_text("{}")
    (tmp_path / "inner").mkdir()  # not searched: a folder is the spaces directly in it
    (tmp_path / "inner" / "c.yaml").write_text("{}")
    a, b = tmp_path / "a.yml", tmp_path / "b.yaml"
    assert space_files([tmp_path]) == [a, b]
    assert space_files([b, tmp_path, tmp_path / "." / "b.yaml"]) == [b, a]
    missing = tmp_path / "none.yaml"  # a file is passed on as given: load_spec names it
    assert space_files([missing]) == [missing]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError) as caught:
        space_files([tmp_path / "empty"])
    assert (
        str(caught.value) == f"{tmp_path / 'empty'}: a folder with no search spaces (*.yaml) in it"
    )


@pytest.mark.parametrize(
    "body",
    [
        tiny_copying(fixed={"lr": 10**400}),  # YAML reads an integer exactly, float() overflows
        tiny_copying(scientific={"method": ["none"], "lr": [1e-3, 10**400]}),
        tiny_copying(resources={"cpus": 10**400}),
    ],
    ids=["fixed", "grid", "resources"],
)
def test_an_integer_beyond_a_double_is_one_line(tmp_path: Path, body: dict) -> None:
    with pytest.raises(ConfigError) as error:
        load_spec(write_space(tmp_path, "huge", body))
    assert str(error.value).endswith(
        "must be a finite number, got an integer too large for a float"
    ), error.value
