from storage import diskgroup, volumes


def test_volume_lifecycle_through_docker(stack):
    node = stack.node
    node.cli("volume", "create", "-d", "veritas", "--name", "demovol", "-o", "size=1g")
    out = node.cli("run", "--rm", "--network", "none", "-v", "demovol:/vol", "localbusybox",
                   "sh", "-c", "echo persisted > /vol/f && cat /vol/f").stdout
    assert out.strip() == "persisted"
    out = node.cli("run", "--rm", "--network", "none", "-v", "demovol:/vol:ro", "localbusybox", "cat", "/vol/f").stdout
    assert out.strip() == "persisted"
    # the data is on the veritas volume itself, not in the directory underneath its mount point
    assert not (stack.env.config.mount_root / "demovol_dockerdg" / "f").exists()
    dg = diskgroup.open_dg(stack.env.config, "dockerdg")
    try:
        mp = volumes.mount(dg, "demovol", "check")
        assert (mp / "f").read_text().strip() == "persisted"
        volumes.umount(dg, "demovol", "check")
    finally:
        dg.close()
    node.cli("volume", "rm", "demovol")
    assert "demovol" not in node.cli("volume", "ls", "-q").stdout
