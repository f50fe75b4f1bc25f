"""Backing names are parsed, never resolved over the network or opened."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from oracle import qemu_img_create, renders

from storprobe import Backing, ImageInfo, probe
from storprobe.backing import BackingStore, Host, parse_backing_name
from storprobe.errors import BackingNameError

TOP = "/images/top.qcow2"


pytestmark = pytest.mark.usefixtures("no_network")  # conftest.py: any name lookup or connect fails


@pytest.mark.parametrize(
    "name, protocol, hosts, target",
    [
        ("nbd://h:10809/exp", "nbd", (Host("tcp", "h", 10809),), "exp"),
        ("nbd+unix:///e?socket=/run/s", "nbd", (Host("unix", socket="/run/s"),), "e"),
        ("nbd:h:1234:exportname=x", "nbd", (Host("tcp", "h", 1234),), "x"),
        ("nbd:unix:/s:exportname=y", "nbd", (Host("unix", socket="/s"),), "y"),
        ("rbd:pool/img@s:mon_host=a\\:6789;b\\:6789:id=admin", "rbd",
         (Host("tcp", "a", 6789), Host("tcp", "b", 6789)), "pool/img@s"),
        ("iscsi://h:3260/iqn.2000-01.com.x:t/1", "iscsi", (Host("tcp", "h", 3260),), "iqn.2000-01.com.x:t/1"),
        ("https://h/p/a.img?x=1", "https", (Host("tcp", "h"),), "/p/a.img?x=1"),
        ("ftp://h:21/a.img", "ftp", (Host("tcp", "h", 21),), "/a.img"),
        ("gluster://g:24007/vol/dir/f", "gluster", (Host("tcp", "g", 24007),), "vol/dir/f"),
        ("gluster+unix:///vol/f?socket=/s", "gluster", (Host("unix", socket="/s"),), "vol/f"),
        ("ssh://root@h:22/var/x", "ssh", (Host("tcp", "h", 22),), "/var/x"),
        ('json:{"file":{"driver":"nbd","server":{"type":"inet","host":"h","port":"1"},"export":"e"}}',
         "nbd", (Host("tcp", "h", 1),), "e"),
        ('json:{"file.driver":"nbd","file.server.type":"unix","file.server.path":"/s","file.export":"e"}',
         "nbd", (Host("unix", socket="/s"),), "e"),
        ('json:{"driver":"raw","file":{"driver":"rbd","pool":"p","image":"i","server":[{"host":"m","port":"6789"}]}}',
         "rbd", (Host("tcp", "m", 6789),), "p/i"),
        ('json:{"file":{"driver":"https","url":"https://h/x.img"}}', "https", (Host("tcp", "h"),), "/x.img"),
        ('json:{"file":{"driver":"iscsi","portal":"h:3260","target":"iqn.x","lun":"2"}}', "iscsi", (), "iqn.x/2"),
        ('json:{"file":{"driver":"gluster","volume":"v","path":"/a","server":[{"type":"tcp","host":"g","port":24007}]}}',
         "gluster", (Host("tcp", "g", 24007),), "v//a"),
    ],
)
def test_network_backings_are_parsed_not_opened(name, protocol, hosts, target):
    store = parse_backing_name(name, TOP)
    assert (store.protocol, store.hosts, store.target, store.path) == (protocol, hosts, target, None)
    assert not store.is_file


@pytest.mark.parametrize(
    "name, path",
    [
        ("base.qcow2", "/images/base.qcow2"),
        ("sub/base.qcow2", "/images/sub/base.qcow2"),
        ("../b.img", "/images/../b.img"),
        ("/abs/b.img", "/abs/b.img"),
        ("file:x.img", "/images/x.img"),
        ("with:colon.img", "/images/with:colon.img"),
        ('json:{"file.driver":"file","file.filename":"rel.img"}', "/images/rel.img"),
        ('json:{"driver":"qcow2","file":{"driver":"file","filename":"/abs/q.qcow2"}}', "/abs/q.qcow2"),
        ('json:{"file":{"driver":"host_device","filename":"/dev/sdz"}}', "/dev/sdz"),
    ],
)
def test_local_backings_resolve_against_the_image_directory(name, path):
    store = parse_backing_name(name, TOP)
    assert store == BackingStore(name, "file", path=path)


@pytest.mark.parametrize(
    "name",
    [
        "json:{", "json:[1]", 'json:{"file":{"filename":"x"}}', 'json:{"file":{"driver":"file"}}',
        "nbd:h:notaport", "nbd://h:99999/x", "nbd:", "rbd:noslash", "rbd:p/i:novalue",
        'json:{"a":1,"a.b":2}', "json:" + "[" * 100000,
    ],
)
def test_malformed_names_are_named_errors(name):
    with pytest.raises(BackingNameError):
        parse_backing_name(name, TOP)


@pytest.fixture(scope="module")
def base_info(tmp_path_factory) -> ImageInfo:
    """A real qcow2's description, its backing swapped in per example."""
    return probe(qemu_img_create(tmp_path_factory.mktemp("base") / "top.qcow2", "qcow2", "1M"))


@given(st.one_of(
    st.text(max_size=200),
    st.text(max_size=200).map(lambda s: "json:" + s),
    st.sampled_from(["nbd:", "rbd:", "nbd://", "iscsi://", "json:{\"file."]).flatmap(
        lambda p: st.text(max_size=100).map(lambda s: p + s)),
))
def test_any_name_parses_or_is_a_named_error(base_info, name):
    """Any name parses or is a named error, and an image naming it renders
    (its volume XML describes the store, or says by name why it cannot)."""
    try:
        parse_backing_name(name, TOP)
    except BackingNameError:
        pass
    renders(base_info._replace(backing=Backing(name, "raw")))
