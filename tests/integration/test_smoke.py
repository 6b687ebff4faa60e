from storage import snapshots, volumes


def test_make_mount_write_snapshot(env, dg):
    volumes.make(dg, "v1", "1g")
    mp = volumes.mount(dg, "v1")
    (mp / "f").write_text("hello")
    snapshots.make(dg, "v1", "s1")
    smp = volumes.mount(dg, "s1")
    assert (smp / "f").read_text() == "hello"
    volumes.umount(dg, "s1")
    volumes.umount(dg, "v1")
