"""The container tests' own logic that needs no podman: where the Debian mirror comes from."""

from __future__ import annotations

from pathlib import Path

from tests.containers.engine import DEFAULT_MIRROR, debian_mirror


def apt_dir(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "apt"
    (root / "sources.list.d").mkdir(parents=True)
    for name, text in files.items():
        (root / name).write_text(text)
    return root


def test_the_mirror_comes_from_a_deb822_sources_file_not_its_security_stanza(tmp_path):
    sources = (
        "Types: deb\n# http://snapshot.debian.org/archive/debian-security/x\n"
        "URIs: http://deb.debian.org/debian-security\nSuites: bookworm-security\nComponents: main\n\n"
        "Types: deb deb-src\nURIs: http://mirror.example/debian/\nSuites: bookworm bookworm-updates\n"
    )
    root = apt_dir(tmp_path, {"sources.list.d/debian.sources": sources})
    assert debian_mirror(root) == "http://mirror.example/debian"


def test_the_mirror_comes_from_a_one_line_list_with_options(tmp_path):
    lines = "# deb http://old.example/debian bookworm main\n"
    lines += "deb [arch=amd64 signed-by=/k.gpg] http://m.example/debian bookworm main\n"
    root = apt_dir(tmp_path, {"sources.list": lines})
    assert debian_mirror(root) == "http://m.example/debian"


def test_other_suites_disabled_stanzas_and_disabled_files_are_passed_over(tmp_path):
    root = apt_dir(
        tmp_path,
        {
            "sources.list": "deb http://trixie.example/debian trixie main\n",
            "sources.list.d/off.sources": "Types: deb\nURIs: http://off.example/debian\nSuites: bookworm\nEnabled: no",
            "sources.list.d/x.list.disabled-by-farm": "deb http://disabled.example/debian bookworm main\n",
        },
    )
    assert debian_mirror(root) == DEFAULT_MIRROR
