"""The config file's [volume] defaults reach make, typos in it are refused, and a snapshot takes its limit
in one step: through the real ``veritas`` CLI on real loop devices (issue 7, items 5 and 13)."""

from __future__ import annotations

import json

from storage.kernel import loop


def _info(env, name: str) -> dict:
    return json.loads(env.cli("--json", "vol", "info", name).stdout)


def test_volume_defaults_of_the_config_file_apply_to_make(env, dg):
    with env.config_path.open("a") as fh:
        fh.write("[volume]\nfstype = ext4\nnmirror = 3\nncol = 3\n")
    env.cli("vol", "make", "c1", "400m")  # 400 MiB would be XFS without the default
    c1 = _info(env, "c1")
    assert (c1["layout"], c1["fstype"]) == ("concat", "ext4"), c1
    env.cli("vol", "make", "m1", "200m", "layout=mirror")
    m1 = _info(env, "m1")
    assert (m1["fstype"], m1["nmirror"], len(m1["subdisks"])) == ("btrfs", 3, 3), m1
    env.cli("vol", "make", "s1", "400m", "layout=stripe")
    s1 = _info(env, "s1")
    assert (s1["ncol"], len(s1["subdisks"])) == (3, 3), s1
    # what a make asks for beats the defaults
    env.cli("vol", "make", "x1", "400m", "fstype=xfs")
    env.cli("vol", "make", "m2", "200m", "layout=mirror", "nmirror=2")
    assert _info(env, "x1")["fstype"] == "xfs"
    assert _info(env, "m2")["nmirror"] == 2
    # the volumes are real: the mirror mounts with three copies
    env.cli("vol", "mount", "m1")
    assert len(_info(env, "m1")["devices"]) == 3
    env.cli("vol", "umount", "m1")


def test_a_typo_in_the_config_file_is_refused_with_file_line_and_valid_keys(env, dg):
    mine = str(env.root) + "/"
    before = sorted(b for b in loop.attached().values() if b.startswith(mine))
    text = env.config_path.read_text()
    env.config_path.write_text(text + "[volume]\nlayout = mirror\nfs_type = ext4\n")
    line = len(text.splitlines()) + 3
    proc = env.cli("vol", "make", "t1", "400m", check=False)
    assert proc.returncode == 2, proc
    message = proc.stderr.strip()
    assert message.startswith(f"veritas: error: config file {env.config_path}, line {line}: unknown key 'fs_type'"
                              " in [volume]; valid keys there: size, layout, fstype, nmirror, ncol"), message
    env.config_path.write_text(text + "[volumes]\nfstype = ext4\n")
    proc = env.cli("vol", "list", check=False)
    assert proc.returncode == 2 and f"line {len(text.splitlines()) + 1}: unknown section [volumes]" in proc.stderr
    assert "[storage], [volume], [node], [plugin]" in proc.stderr, proc.stderr
    env.config_path.write_text(text)
    assert json.loads(env.cli("--json", "vol", "list").stdout) == []
    assert sorted(b for b in loop.attached().values() if b.startswith(mine)) == before


def test_snapshot_with_a_limit_is_one_step(env, dg):
    env.cli("vol", "make", "v1", "400m", "maxiops=100")
    env.cli("snap", "make", "v1", "s1", "maxiops=300")
    assert _info(env, "s1")["maxiops"] == 300 and _info(env, "s1")["snapshot_of"] == "v1"
    env.cli("snap", "make", "v1", "s2")
    assert _info(env, "s2")["maxiops"] == 100  # the source's, unless asked
    proc = env.cli("snap", "make", "v1", "s3", "maxiops=abc", check=False)
    assert proc.returncode == 2 and "maxiops" in proc.stderr, proc
    assert sorted(v["name"] for v in json.loads(env.cli("--json", "vol", "list").stdout)) == ["s1", "s2", "v1"]
