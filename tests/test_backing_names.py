"""Backing names are read as QEMU reads them, parsed, never resolved over the
network or opened.

Three tables: one sample per block protocol of QEMU 7.2 (``.protocol_name`` of
each driver in block/*.c, checked against the installed qemu-img), libvirt's own
table of backing names (tests/virstoragetest.c, TEST_BACKING_PARSE, 70 names,
each with what we make of it), and names QEMU refuses. Real images recording
such names are then described by ``storprobe info`` and ``scan``.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st
from lxml import etree

from storprobe import Backing, ImageInfo, ProbeError, probe
from storprobe.backing import (
    JSON_DRIVERS,
    LAYER_DRIVERS,
    LEGACY_PROTOCOLS,
    PROTOCOLS,
    REACHES,
    BackingStore,
    Host,
    RefusedName,
    describe_backing_name,
    parse_backing_name,
)
from storprobe.chain import probe_chain
from storprobe.errors import BackingNameError
from storprobe.validate import schema_errors
from storprobe.volume_xml import to_volume_xml

from oracle import LibvirtPool, qemu_img_create, qemu_img_error, renders, require, run

TOP = "/images/top.qcow2"
REFUSED = "refused"


def tcp(name: str, port: int | None = None) -> Host:
    return Host("tcp", name, port)


def unix(socket: str) -> Host:
    return Host("unix", socket=socket)


pytestmark = pytest.mark.usefixtures("no_network")  # conftest.py: any name lookup or connect fails


def facts(store: BackingStore) -> tuple:
    return (store.protocol, store.reach, store.path, store.hosts, store.target)


# --- one name (or more) per protocol QEMU 7.2 has ----------------------------------------
# (name, (protocol, reach, path, hosts, target)); a port of None is the protocol's default.
PROTOCOL_NAMES = [
    ("file:/abs/x.img", ("file", "file", "/abs/x.img", (), None)),
    ("file:x.img", ("file", "file", "x.img", (), None)),  # relative to QEMU's working directory, not the image's
    ("host_device:/dev/vda", ("host_device", "host-device", "/dev/vda", (), None)),
    ("host_cdrom:/dev/sr0", ("host_cdrom", "host-device", "/dev/sr0", (), None)),
    # vvfat's protocol is fat: the directory follows the last colon, options before it
    ("fat:/srv/share", ("vvfat", "host-directory", "/srv/share", (), None)),
    ("fat:/", ("vvfat", "host-directory", "/", (), None)),
    ("fat:floppy:rw:12:/etc", ("vvfat", "host-directory", "/etc", (), None)),
    ("fat:rw:c:/dos", ("vvfat", "host-directory", "c:/dos", (), None)),  # vvfat keeps a DOS drive letter
    ("fat:relative/dir", ("vvfat", "host-directory", "relative/dir", (), None)),
    ("blkdebug:/etc/rules.conf:/images/base.img", ("blkdebug", "host-file", "/etc/rules.conf", (), None)),
    ("blkdebug::/etc/shadow", ("blkdebug", "host-file", "/etc/shadow", (), None)),
    ("blkverify:/raw.img:/test.img", ("blkverify", "host-file", "/raw.img", (), None)),
    ("null-co://", ("null-co", "none", None, (), None)),
    ("null-aio://", ("null-aio", "none", None, (), None)),
    ("nbd://h:10809/exp", ("nbd", "network", None, (tcp("h", 10809),), "exp")),
    ("nbd+tcp://[fe80::1]/exp", ("nbd", "network", None, (tcp("fe80::1"),), "exp")),
    ("nbd+unix:///e?socket=/run/s", ("nbd", "network", None, (unix("/run/s"),), "e")),
    ("nbd:h:1234:exportname=x", ("nbd", "network", None, (tcp("h", 1234),), "x")),
    ("nbd:unix:/s:exportname=y", ("nbd", "network", None, (unix("/s"),), "y")),
    ("nbd:h:1234,ipv4", ("nbd", "network", None, (tcp("h", 1234),), None)),  # inet_parse flags after a comma
    ("rbd:pool/img", ("rbd", "network", None, (), "pool/img")),
    ("rbd:pool/img@s:mon_host=a\\:6789;b\\:6789:id=admin", ("rbd", "network", None,
                                                           (tcp("a", 6789), tcp("b", 6789)), "pool/img")),
    ("rbd:p\\/q/ns/i:conf=/etc/ceph/c.conf:mon_host=[\\:\\:1]\\:6789", ("rbd", "network", None,
                                                                  (tcp("::1", 6789),), "p/q/ns/i")),
    ("rbd:pool:x/img", ("rbd", "network", None, (), "pool:x/img")),  # the pool ends at the first '/'
    ("iscsi://h:3260/iqn.2000-01.com.x:t/1", ("iscsi", "network", None, (tcp("h", 3260),), "iqn.2000-01.com.x:t/1")),
    ("iser://h/iqn.x:t/0", ("iser", "network", None, (Host("rdma", "h"),), "iqn.x:t/0")),
    ("nfs://h/export/a.img?uid=0&readahead-size=0x10", ("nfs", "network", None, (tcp("h"),), "/export/a.img")),
    ("ssh://root@h:22/var/x", ("ssh", "network", None, (tcp("h", 22),), "/var/x")),
    ("gluster://g:24007/vol/dir/f", ("gluster", "network", None, (tcp("g", 24007),), "vol/dir/f")),
    ("gluster+tcp:///vol//f", ("gluster", "network", None, (tcp("localhost"),), "vol/f")),  # no host: localhost
    ("gluster+unix:///vol/f?socket=/s", ("gluster", "network", None, (unix("/s"),), "vol/f")),
    # libvirt says transport rdma; QEMU 7.2 warns and connects over tcp, and we say what happens
    ("gluster+rdma://g/vol/f", ("gluster", "network", None, (tcp("g"),), "vol/f")),
    ("http://h/p/a%5fb.img?x=1", ("http", "network", None, (tcp("h"),), "p/a_b.img")),
    ("https://h:8443/x.img", ("https", "network", None, (tcp("h", 8443),), "x.img")),
    ("ftp://h:21/a.img", ("ftp", "network", None, (tcp("h", 21),), "a.img")),
    ("ftps://h/a.img", ("ftps", "network", None, (tcp("h"),), "a.img")),
    ("nvme://0000:01:00.0/2", ("nvme", "host-device", None, (), "0000:01:00.0/2")),
    ("nvme://0000:01:00.0/", ("nvme", "host-device", None, (), "0000:01:00.0/1")),  # namespace 1 by default
    # blkio.c (libblkio; Debian's 7.2 is built without it)
    ("io_uring:/dev/sda", ("io_uring", "host-file", "/dev/sda", (), None)),
    ("nvme-io_uring:/dev/ng0n1", ("nvme-io_uring", "host-device", "/dev/ng0n1", (), None)),
    ("virtio-blk-vfio-pci:/sys/bus/pci/devices/0000:00:01.0", ("virtio-blk-vfio-pci", "host-device",
                                                                "/sys/bus/pci/devices/0000:00:01.0", (), None)),
    ("virtio-blk-vhost-vdpa:/dev/vhost-vdpa-0", ("virtio-blk-vhost-vdpa", "host-device", "/dev/vhost-vdpa-0",
                                                 (), None)),
    ("virtio-blk-vhost-user:/run/vu.sock", ("virtio-blk-vhost-user", "network", None, (unix("/run/vu.sock"),),
                                           None)),
    # gone from QEMU (sheepdog and vxhs in 6.0, tftp from curl), still parsed by libvirt
    ("sheepdog:vdi", ("sheepdog", "network", None, (), "vdi")),
    ("sheepdog:h:7000:vdi:snap", ("sheepdog", "network", None, (tcp("h", 7000),), "vdi")),
    ("sheepdog://h:7000/vdi#snap", ("sheepdog", "network", None, (tcp("h", 7000),), "vdi")),
    ("sheepdog+unix:///vdi?socket=/s", ("sheepdog", "network", None, (unix("/s"),), "vdi")),
    ("vxhs://h:9999/c6718f6b", ("vxhs", "network", None, (tcp("h", 9999),), "c6718f6b")),
    ("tftp://h/boot.img", ("tftp", "network", None, (tcp("h"),), "boot.img")),
    # plain names, and json: specifications of every kind
    ("base.qcow2", ("file", "file", "/images/base.qcow2", (), None)),
    ("../b.img", ("file", "file", "/images/../b.img", (), None)),
    ("sub/a:b.img", ("file", "file", "/images/sub/a:b.img", (), None)),  # a slash before the colon: a file
    ('json:{"file.driver":"file","file.filename":"rel.img"}', ("file", "file", "rel.img", (), None)),
    ('json:{"file":{"driver":"host_device","filename":"/dev/sdz"}}', ("host_device", "host-device", "/dev/sdz",
                                                                        (), None)),
    ('json:{"driver":"vvfat","dir":"/","rw":true}', ("vvfat", "host-directory", "/", (), None)),
    ('json:{"driver":"raw","file":{"filename":"fat:/home"}}', ("vvfat", "host-directory", "/home", (), None)),
    ('json:{"driver":"null-co","size":5}', ("null-co", "none", None, (), None)),
    ('json:{"driver":"blkdebug","config":"/etc/r.conf","image":{"driver":"file","filename":"/x"}}',
     ("blkdebug", "host-file", "/etc/r.conf", (), None)),
    ('json:{"driver":"blkdebug","image.driver":"file","image.filename":"/etc/shadow"}',
     ("blkdebug", "host-file", "/etc/shadow", (), None)),
    ('json:{"driver":"blkverify","raw":{"driver":"file","filename":"/r"},"test":{"driver":"file","filename":"/t"}}',
     ("blkverify", "host-file", "/r", (), None)),
    ('json:{"driver":"throttle","file":{"driver":"copy-on-read","file":{"driver":"nbd","path":"/s"}}}',
     ("nbd", "network", None, (unix("/s"),), None)),
    ('json:{"driver":"io_uring","filename":"/dev/sdb"}', ("io_uring", "host-file", "/dev/sdb", (), None)),
    ('json:{"file":{"driver":"iser","portal":"h","target":"iqn.x","lun":2}}',
     ("iser", "network", None, (Host("rdma", "h"),), "iqn.x/2")),
    ('json:{"file":{"driver":"gluster","volume":"v","path":"a","server":[{"type":"tcp","host":"g","port":24007}]}}',
     ("gluster", "network", None, (tcp("g", 24007),), "v/a")),
    # a dotted key written at the top yields to the same key reached through nesting (qdict_flatten)
    ('json:{"file.filename":"/etc/passwd","file":{"driver":"file","filename":"/etc/hostname"}}',
     ("file", "file", "/etc/hostname", (), None)),
]


@pytest.mark.parametrize("name, expected", PROTOCOL_NAMES, ids=[n for n, _ in PROTOCOL_NAMES])
def test_every_protocol_is_what_it_reaches(name, expected):
    store = parse_backing_name(name, TOP)
    assert facts(store) == expected
    assert store.reach in REACHES and store.is_file == (store.reach == "file")
    assert describe_backing_name(name, TOP) == store


def test_the_tables_cover_every_protocol():
    """Every protocol of the tables has a sample name above, and every name is
    under its own protocol's row."""
    sampled = {parse_backing_name(name, TOP).protocol for name, _ in PROTOCOL_NAMES}
    assert sampled >= {p.driver for p in (*PROTOCOLS.values(), *LEGACY_PROTOCOLS.values())}
    assert not set(JSON_DRIVERS) & LAYER_DRIVERS


def _qemu_drivers() -> list[str]:
    out = run("qemu-img", "--help").stdout.decode()
    return re.search(r"Supported formats: (.*)", out).group(1).split()


@pytest.fixture(scope="module")
def qemu_drivers() -> list[str]:
    return _qemu_drivers()


def test_our_tables_know_every_driver_of_the_installed_qemu(qemu_drivers):
    """Each driver qemu-img has is a protocol of ours or a format/filter layer."""
    assert set(qemu_drivers) - set(JSON_DRIVERS) - LAYER_DRIVERS == set()


@pytest.mark.parametrize("prefix", [*PROTOCOLS, *LEGACY_PROTOCOLS, *sorted(LAYER_DRIVERS), "vvfat", "FILE", "NBD",
                                    "with", ""])
def test_the_installed_qemu_agrees_on_which_prefixes_are_protocols(qemu_drivers, prefix):
    """qemu-img says ``Unknown protocol`` exactly for the prefixes we refuse as
    unknown. ``PREFIX:`` alone never reaches a server (every driver refuses it
    while parsing), and we refuse it too. QEMU's protocol names are case-sensitive;
    ``vvfat`` is a driver whose protocol is ``fat``; a format driver is no protocol."""
    protocol = PROTOCOLS.get(prefix)
    if protocol is not None and protocol.driver not in qemu_drivers:
        pytest.skip(f"this qemu-img is built without {protocol.driver}")
    error = qemu_img_error(f"{prefix}:")
    assert error is not None
    unknown = f"Unknown protocol '{prefix}'" in error
    assert unknown == (prefix not in PROTOCOLS), error
    with pytest.raises(BackingNameError) as caught:
        parse_backing_name(f"{prefix}:", TOP)
    assert ("which QEMU does not have" in caught.value.reason) == (unknown and prefix not in LEGACY_PROTOCOLS)


# --- libvirt's table (tests/virstoragetest.c, TEST_BACKING_PARSE), name by name ------------
# libvirt writes a protocol's default port out (http 80, gluster 24007, iscsi 3260);
# we leave it None. Where libvirt and QEMU disagree, QEMU (which opens the backing)
# decides, and the row says so.
GLUSTER_3 = '"server.0.host": "A.A.A.A", "server.1.host": "B.B.B.B", "server.2.host": "C.C.C.C", '
LIBVIRT_TABLE = [
    ("path", ("file", "file", "/images/path", (), None)),
    ("fat:/somedir", ("vvfat", "host-directory", "/somedir", (), None)),
    ("://", REFUSED),
    ("http://example.com", ("http", "network", None, (tcp("example.com"),), None)),
    ("http://example.com/", ("http", "network", None, (tcp("example.com"),), None)),
    ("http://example.com/file", ("http", "network", None, (tcp("example.com"),), "file")),
    ("http://user:pass@example.com/file", ("http", "network", None, (tcp("example.com"),), "file")),
    # libvirt: name 'testshare'; QEMU: "Pool name is required" (rbd:POOL/IMAGE)
    ("rbd:testshare:id=asdf:mon_host=example.com", REFUSED),
    ("nbd:example.org:6000:exportname=blah", ("nbd", "network", None, (tcp("example.org", 6000),), "blah")),
    ("nbd:example.org:6000:exportname=:", ("nbd", "network", None, (tcp("example.org", 6000),), ":")),
    ("nbd:example.org:6000:exportname=:test", ("nbd", "network", None, (tcp("example.org", 6000),), ":test")),
    ("nbd:[::1]:6000:exportname=:test", ("nbd", "network", None, (tcp("::1", 6000),), ":test")),
    ("nbd:127.0.0.1:6000:exportname=:test", ("nbd", "network", None, (tcp("127.0.0.1", 6000),), ":test")),
    ("nbd:unix:/tmp/sock:exportname=/", ("nbd", "network", None, (unix("/tmp/sock"),), "/")),
    ("nbd:unix:/tmp/sock:", ("nbd", "network", None, (unix("/tmp/sock:"),), None)),
    ("nbd:unix:/tmp/sock::exportname=:", ("nbd", "network", None, (unix("/tmp/sock:"),), ":")),
    ("nbd://example.org:1234", ("nbd", "network", None, (tcp("example.org", 1234),), None)),
    ("nbd://example.org:1234/", ("nbd", "network", None, (tcp("example.org", 1234),), None)),
    ("nbd://example.org:1234/exportname", ("nbd", "network", None, (tcp("example.org", 1234),), "exportname")),
    ("nbd+unix://?socket=/tmp/sock", ("nbd", "network", None, (unix("/tmp/sock"),), None)),
    ("nbd+unix:///?socket=/tmp/sock", ("nbd", "network", None, (unix("/tmp/sock"),), None)),
    ("nbd+unix:////?socket=/tmp/sock", ("nbd", "network", None, (unix("/tmp/sock"),), "/")),
    ("nbd+unix:///exp?socket=/tmp/sock", ("nbd", "network", None, (unix("/tmp/sock"),), "exp")),
    ("nbd+unix:////exp?socket=/tmp/sock", ("nbd", "network", None, (unix("/tmp/sock"),), "/exp")),
    # libvirt: name 'exportname'; QEMU (libiscsi) needs iscsi://HOST/TARGET/LUN: "Failed to parse URL"
    ("iscsi://testuser:testpass@example.org:1234/exportname", REFUSED),
    ("json:", REFUSED),
    ("json:asdgsdfg", REFUSED),
    ("json:{}", REFUSED),
    ('json: { "file.driver":"blah"}', REFUSED),
    ('json:{"file.driver":"file"}', REFUSED),
    ('json:{"file.driver":"file", "file.filename":"/path/to/file"}', ("file", "file", "/path/to/file", (), None)),
    ('json:{"file.driver":"file", "filename":"/path/to/file"}', REFUSED),
    ('json:{"file" : { "driver":"file","filename":"/path/to/file"}}', ("file", "file", "/path/to/file", (), None)),
    ('json:{"driver":"file","filename":"/path/to/file"}', ("file", "file", "/path/to/file", (), None)),
    ('json:{"file.driver":"host_device", "file.filename":"/path/to/dev"}',
     ("host_device", "host-device", "/path/to/dev", (), None)),
    ('json:{"file.driver":"host_cdrom", "file.filename":"/path/to/cdrom"}',
     ("host_cdrom", "host-device", "/path/to/cdrom", (), None)),
    ('json:{"file.driver":"http", "file.url":"http://example.com/file"}',
     ("http", "network", None, (tcp("example.com"),), "file")),
    ('json:{"file":{ "driver":"http","url":"http://example.com/file"}}',
     ("http", "network", None, (tcp("example.com"),), "file")),
    ('json:{"file.driver":"ftp", "file.url":"http://example.com/file"}', REFUSED),
    ('json:{"file.driver":"gluster", "file.filename":"gluster://example.com/vol/file"}',
     ("gluster", "network", None, (tcp("example.com"),), "vol/file")),
    ('json:{"file":{"driver":"gluster","volume":"testvol","path":"img.qcow2","server":[ { "type":"tcp",'
     '"host":"example.com","port":"1234"},{ "type":"unix","socket":"/path/socket"},{ "type":"tcp",'
     '"host":"example.com"}]}}',
     ("gluster", "network", None, (tcp("example.com", 1234), unix("/path/socket"), tcp("example.com")),
      "testvol/img.qcow2")),
    ('json:{"file.driver":"gluster","file.volume":"testvol","file.path":"img.qcow2","file.server":[ { "type":"tcp",'
     '"host":"example.com","port":"1234"},{ "type":"unix","socket":"/path/socket"},{ "type":"inet",'
     '"host":"example.com"}]}',
     ("gluster", "network", None, (tcp("example.com", 1234), unix("/path/socket"), tcp("example.com")),
      "testvol/img.qcow2")),
    ('json:{"driver": "raw","file": {' + GLUSTER_3 + '"driver": "gluster","path": "raw","server.0.type": "tcp",'
     '"server.1.type": "tcp","server.2.type": "tcp","server.0.port": "24007","server.1.port": "24007",'
     '"server.2.port": "24007","volume": "vol1"}}',
     ("gluster", "network", None, (tcp("A.A.A.A", 24007), tcp("B.B.B.B", 24007), tcp("C.C.C.C", 24007)),
      "vol1/raw")),
    ('json:{"file":{"driver":"nbd","path":"/path/to/socket"}}',
     ("nbd", "network", None, (unix("/path/to/socket"),), None)),
    ('json:{"driver":"nbd","path":"/path/to/socket"}', ("nbd", "network", None, (unix("/path/to/socket"),), None)),
    ('json:{"file.driver":"nbd","file.path":"/path/to/socket"}',
     ("nbd", "network", None, (unix("/path/to/socket"),), None)),
    ('json:{"file":{"driver":"nbd","export":"blah","host":"example.org","port":"6000"}}',
     ("nbd", "network", None, (tcp("example.org", 6000),), "blah")),
    ('json:{"file.driver":"nbd","file.export":"blah","file.host":"example.org","file.port":"6000"}',
     ("nbd", "network", None, (tcp("example.org", 6000),), "blah")),
    ('json:{"file":{"driver":"nbd","export":"blah","server": { "type":"inet","host":"example.org","port":"6000"}}}',
     ("nbd", "network", None, (tcp("example.org", 6000),), "blah")),
    ('json:{"file":{"driver":"nbd","server": { "type":"unix","path":"/path/socket"}}}',
     ("nbd", "network", None, (unix("/path/socket"),), None)),
    ('json:{"file":{"driver":"ssh","host":"example.org","port":"6000","path":"blah","user":"user"}}',
     ("ssh", "network", None, (tcp("example.org", 6000),), "blah")),
    ('json:{"file.driver":"ssh","file.host":"example.org","file.port":"6000","file.path":"blah","file.user":"user"}',
     ("ssh", "network", None, (tcp("example.org", 6000),), "blah")),
    ('json:{"file":{"driver":"ssh","path":"blah","server":{ "host":"example.org","port":"6000"},"user":"user"}}',
     ("ssh", "network", None, (tcp("example.org", 6000),), "blah")),
    # libvirt: name 'testshare'; QEMU parses the filename as rbd: and requires a pool
    ('json:{"file.driver":"rbd","file.filename":"rbd:testshare:id=asdf:mon_host=example.com"}', REFUSED),
    ('json:{"file":{"driver":"rbd","image":"test","pool":"libvirt","conf":"/path/to/conf","snapshot":"snapshotname",'
     '"server":[ {"host":"example.com","port":"1234"},{"host":"example2.com"}]}}',
     ("rbd", "network", None, (tcp("example.com", 1234), tcp("example2.com")), "libvirt/test")),
    ('json:{ "file": { "driver": "raw","file": {"driver": "file","filename": "/path/to/file" } } }',
     ("file", "file", "/path/to/file", (), None)),
    ('json:{"file":{"driver":"iscsi","transport":"tcp","portal":"test.org",'
     '"target":"iqn.2016-12.com.virttest:emulated-iscsi-noauth.target"}}',
     ("iscsi", "network", None, (tcp("test.org"),), "iqn.2016-12.com.virttest:emulated-iscsi-noauth.target/0")),
    ('json:{"file":{"driver":"iscsi","transport":"tcp","portal":"test.org","user":"testuser",'
     '"target":"iqn.2016-12.com.virttest:emulated-iscsi-auth.target"}}',
     ("iscsi", "network", None, (tcp("test.org"),), "iqn.2016-12.com.virttest:emulated-iscsi-auth.target/0")),
    ('json:{"file":{"driver":"iscsi","transport":"tcp","portal":"test.org","password":"testpass",'
     '"target":"iqn.2016-12.com.virttest:emulated-iscsi-auth.target"}}',
     ("iscsi", "network", None, (tcp("test.org"),), "iqn.2016-12.com.virttest:emulated-iscsi-auth.target/0")),
    ('json:{"file":{"driver":"iscsi","transport":"tcp","portal":"test.org:1234",'
     '"target":"iqn.2016-12.com.virttest:emulated-iscsi-noauth.target","lun":"6"}}',
     ("iscsi", "network", None, (tcp("test.org", 1234),), "iqn.2016-12.com.virttest:emulated-iscsi-noauth.target/6")),
    # libvirt keeps the brackets ('[2001::0]'), though for nbd:[::1] it drops them; the host is the address
    ('json:{"file":{"driver":"iscsi","transport":"tcp","portal":"[2001::0]:1234",'
     '"target":"iqn.2016-12.com.virttest:emulated-iscsi-noauth.target","lun":6}}',
     ("iscsi", "network", None, (tcp("2001::0", 1234),), "iqn.2016-12.com.virttest:emulated-iscsi-noauth.target/6")),
    ('json:{"file":{"driver":"iscsi","transport":"tcp","portal":"[2001::0]",'
     '"target":"iqn.2016-12.com.virttest:emulated-iscsi-noauth.target","lun":6}}',
     ("iscsi", "network", None, (tcp("2001::0"),), "iqn.2016-12.com.virttest:emulated-iscsi-noauth.target/6")),
    ('json:{"file":{"driver":"sheepdog","vdi":"test","server":{ "type":"inet","host":"example.com","port":"321"}}}',
     ("sheepdog", "network", None, (tcp("example.com", 321),), "test")),
    ('json:{"driver": "raw","file": {"server.host": "10.10.10.10","server.port": "7000","tag": "",'
     '"driver": "sheepdog","server.type": "inet","vdi": "Alice"}}',
     ("sheepdog", "network", None, (tcp("10.10.10.10", 7000),), "Alice")),
    ('json:{"file":{"driver":"vxhs","vdisk-id":"c6718f6b-0401-441d-a8c3-1f0064d75ee0",'
     '"server": {  "host":"example.com","port":"9999"}}}',
     ("vxhs", "network", None, (tcp("example.com", 9999),), "c6718f6b-0401-441d-a8c3-1f0064d75ee0")),
    ('json:{"file":{"driver":"nfs","user":2,"group":9,"path":"/foo/bar/baz",'
     '"server": {  "host":"example.com","type":"inet"}}}',
     ("nfs", "network", None, (tcp("example.com"),), "/foo/bar/baz")),
    ('json:{ "driver": "raw","offset": 10752,"size": 4063232,"file": { "driver": "file","filename": "/tmp/testfle"}}',
     ("file", "file", "/tmp/testfle", (), None)),
    (r'json:{ "file.cookie": "vmware_soap_session=\"0c8db85112873a79b7ef74f294cb70ef7f\"","file.sslverify": false,'
     r'"file.driver": "https","file.url": "https://host/folder/esx6.5-rhel7.7-x86%5f64/esx6.5-rhel7.7-x86%5f64-flat'
     r'.vmdk?dcPath=data&dsName=esx6.5-matrix","file.timeout": 2000}',
     ("https", "network", None, (tcp("host"),), "folder/esx6.5-rhel7.7-x86_64/esx6.5-rhel7.7-x86_64-flat.vmdk")),
    (r'json:{ "file.cookie": "vmware_soap_session=\"0c8db85112873a79b7ef74f294cb70ef7f\"","file.sslverify": "off",'
     r'"file.driver": "https","file.url": "https://host/folder/esx6.5-rhel7.7-x86%5f64/esx6.5-rhel7.7-x86%5f64-flat'
     r'.vmdk?dcPath=data&dsName=esx6.5-matrix","file.timeout": 2000}',
     ("https", "network", None, (tcp("host"),), "folder/esx6.5-rhel7.7-x86_64/esx6.5-rhel7.7-x86_64-flat.vmdk")),
    ('json:{"file":{"driver": "nvme","device": "0000:01:00.0","namespace": 1}}',
     ("nvme", "host-device", None, (), "0000:01:00.0/1")),
]


def test_libvirts_table_has_its_70_names():
    assert len(LIBVIRT_TABLE) == 70 and len({name for name, _ in LIBVIRT_TABLE}) == 70


@pytest.mark.parametrize("name, expected", LIBVIRT_TABLE, ids=range(len(LIBVIRT_TABLE)))
def test_libvirts_table_of_backing_names(name, expected):
    if expected == REFUSED:
        with pytest.raises(BackingNameError):
            parse_backing_name(name, TOP)
        refused = describe_backing_name(name, TOP)
        assert isinstance(refused, RefusedName) and refused.name == name and refused.code == "backing.name"
        assert refused == describe_backing_name(name, TOP)  # a record holding it compares as a value
    else:
        assert facts(parse_backing_name(name, TOP)) == expected


def test_options_keep_what_the_name_says_beside_its_target():
    assert parse_backing_name("rbd:pool/img@s:conf=/c:id=admin:k=v", TOP).options == {
        "snapshot": "s", "conf": "/c", "user": "admin", "k": "v"}
    assert parse_backing_name("http://h/x?a=1&b=2", TOP).options == {"query": "a=1&b=2"}
    assert parse_backing_name("fat:floppy:rw:16:/d", TOP).options == {"floppy": "on", "rw": "on", "fat-type": "16"}
    assert parse_backing_name("blkdebug:/r.conf:/img", TOP).options == {"config": "/r.conf", "image": "/img"}
    assert parse_backing_name('json:{"file":{"driver":"iscsi","portal":"h","target":"t","password":"secret"}}',
                              TOP).options == {}


# --- names QEMU refuses -------------------------------------------------------------------
QEMU_REFUSES = [
    "with:colon.img",  # "Unknown protocol 'with'": a file name with a colon needs ./ or file:
    "vvfat:/x", "throttle:/x", "FILE:/x", "NBD://127.0.0.1/x", "raw:x",
    "file:", "fat:", "blkdebug:/only-one", "blkverify:/only-one", "null-co:", "null-co:/x", "null-aio://x",
    "nbd:", "nbd:127.0.0.1", "nbd:127.0.0.1:1:exportname=", "nbd:127.0.0.1:notaport", "nbd:unix:",
    "nbd:///x", "nbd://127.0.0.1/x?socket=/s", "nbd+unix://127.0.0.1/x?socket=/s", "nbd+unix:///x",
    "nbd+tcp:127.0.0.1:1", "nbd://127.0.0.1:99999/x", "nbd:exportname=x",
    "rbd:", "rbd:noslash", "rbd:p/i:novalue", "rbd:/img",
    "iscsi://127.0.0.1/iqn.x:t", "iscsi://127.0.0.1:1/t/notalun", "iscsi:x", "iser:x",
    "gluster://127.0.0.1/vol", "gluster:x", "gluster+unix:///v/p", "nfs://127.0.0.1", "nfs:x",
    "nfs://127.0.0.1/x?colour=3", "ssh://127.0.0.1", "ssh:x", "http:x", "https://", "nvme:x", "nvme://0000:01:00.0",
    "json:{", "json:[1]", 'json:{"0":1}', 'json:{"driver":[]}', 'json:{"file":{"filename":"x","file":{}}}',
    'json:{"file":{"driver":"file"}}',
    'json:{"a":1,"a.b":2}', 'json:{"a.b":1,"a":2}', "json:" + "[" * 100000,
    'json:{"driver":"raw","driver":"qcow2","file":{"driver":"file","filename":"/etc/hostname"}}',  # duplicate key
    'json:{"file":{"driver":"nbd","server.0.host":"127.0.0.1"}}',  # server is an object, not an array
    'json:{"file":{"driver":"nbd","server":{"host":"127.0.0.1","port":"1"},"server.host":"127.0.0.2"}}',
]


@pytest.mark.parametrize("name", QEMU_REFUSES)
def test_names_qemu_refuses_are_named_errors(name):
    with pytest.raises(BackingNameError) as caught:
        parse_backing_name(name, TOP)
    assert caught.value.code == "backing.name"


@pytest.mark.parametrize("name", [n for n in QEMU_REFUSES if not n.endswith("[" * 100)])
def test_qemu_refuses_them_too(name):
    """Each refused before any connection (the hosts are loopback, in case)."""
    assert qemu_img_error(name) is not None


# QEMU opens these, but storprobe cannot say what they reach: named errors, so
# that `check` calls them unsafe.
@pytest.mark.parametrize("name", [
    'json:{"driver":"quorum","vote-threshold":1,"children":[{"driver":"file","filename":"/etc/hostname"}]}',
    'json:{"driver":"qcow2","file":{"driver":"file","filename":"/a"},"backing":{"driver":"file","filename":"/b"}}',
    'json:{"driver":"qcow2","file":{"driver":"file","filename":"/a"},"data-file":{"driver":"file","filename":"/b"}}',
])
def test_specifications_opening_more_than_one_store_are_not_described(name):
    with pytest.raises(BackingNameError):
        parse_backing_name(name, TOP)


# --- real images recording such names ----------------------------------------------------


def _image_with_backing(directory, name: str, backing: str, fmt: str = "raw"):
    image = directory / name
    run("qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", fmt, image, "1M")
    return image


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "storprobe", *map(str, args)], capture_output=True, text=True,
                          check=False)


REAL_NAMES = {
    "fat.qcow2": ("fat:/tmp/x", {"protocol": "vvfat", "reach": "host-directory", "path": "/tmp/x"}),
    "dev.qcow2": ("host_device:/dev/vda", {"protocol": "host_device", "reach": "host-device", "path": "/dev/vda"}),
    "cd.qcow2": ("host_cdrom:/dev/sr0", {"protocol": "host_cdrom", "reach": "host-device", "path": "/dev/sr0"}),
    "null.qcow2": ("null-co://", {"protocol": "null-co", "reach": "none"}),
    "dbg.qcow2": ("blkdebug::/etc/shadow", {"protocol": "blkdebug", "reach": "host-file", "path": "/etc/shadow",
                                            "options": {"image": "/etc/shadow"}}),
    "nbd.qcow2": ("nbd:[::1]:6000:exportname=:test", {
        "protocol": "nbd", "reach": "network", "hosts": [{"transport": "tcp", "name": "::1", "port": 6000}],
        "target": ":test"}),
    "rbd.qcow2": ("rbd:nopool", {"error": {"code": "backing.name",
                                           "message": "backing 'rbd:nopool' names no rbd pool (rbd:POOL/IMAGE)"}}),
    "json.qcow2": ('json:{"file":', None),
}


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pool")
    for file, (backing, _) in REAL_NAMES.items():
        _image_with_backing(directory, file, backing)
    return directory


@pytest.mark.parametrize("file", REAL_NAMES)
def test_info_json_says_what_a_recorded_name_reaches(real, file):
    backing, expected = REAL_NAMES[file]
    cli = _cli("info", "--output", "json", real / file)
    assert (cli.returncode, cli.stderr) == (0, "")
    out = json.loads(cli.stdout)
    assert out["backing-filename"] == out["full-backing-filename"] == backing  # as qemu-img prints a protocol name
    store = out["storprobe"]["backing-store"]
    assert store.pop("name") == backing
    if expected is None:
        assert store["error"]["code"] == "backing.name"
    else:
        assert store == expected
    human = _cli("info", real / file)
    assert human.returncode == 0 and f"backing file: {backing}\n" in human.stdout


@pytest.fixture(scope="module")
def libvirt_pool(real):
    pool = LibvirtPool(real, f"storprobe-backing-{id(real)}")
    yield pool
    pool.destroy()


@pytest.mark.parametrize("file", REAL_NAMES)
def test_info_xml_describes_the_volume_as_virsh_does(real, libvirt_pool, file):
    """A backing that is no local file, and one QEMU refuses, is the name as
    recorded in ``<path>``, as virsh vol-dumpxml prints it (the rest of the
    volume is described, exit 0) -- except where the spec wins: a network store
    libvirt has a protocol for is its ``<source>`` (our schema's extension), and
    ``fat:DIR`` stays as written (libvirt prints the directory alone, which reads
    as a file)."""
    backing, expected = REAL_NAMES[file]
    cli = _cli("info", "--output", "xml", real / file)
    assert (cli.returncode, cli.stderr) == (0, "")
    assert schema_errors(cli.stdout) == []
    ours = etree.fromstring(cli.stdout.encode()).find("backingStore")
    theirs = etree.fromstring(libvirt_pool.dumpxml(file).encode()).find("backingStore")
    assert ours.find("format").get("type") == "raw"
    if file == "nbd.qcow2":
        source = ours.find("source")
        assert (ours.get("type"), source.get("protocol"), source.get("name")) == ("network", "nbd", ":test")
        assert [h.attrib for h in source] == [{"transport": "tcp", "name": "::1", "port": "6000"}]
        assert theirs.findtext("path") == backing
    elif file == "fat.qcow2":
        assert (ours.findtext("path"), theirs.findtext("path")) == (backing, "/tmp/x")
    else:
        assert ours.findtext("path") == theirs.findtext("path") == backing
        assert ours.find("format").attrib == theirs.find("format").attrib


def test_the_recorded_format_of_a_store_that_is_no_file_is_kept(tmp_path):
    """libvirt 9.0 "fakes" raw as the format of any backing that is not local
    storage (storage_util.c); the image recorded another, and we print that."""
    _image_with_backing(tmp_path, "dev.qcow2", "host_device:/dev/vda", "qcow2")
    pool = LibvirtPool(tmp_path, f"storprobe-format-{id(tmp_path)}")
    try:
        theirs = etree.fromstring(pool.dumpxml("dev.qcow2").encode()).find("backingStore")
    finally:
        pool.destroy()
    ours = etree.fromstring(to_volume_xml(probe(tmp_path / "dev.qcow2")).encode()).find("backingStore")
    assert ours.findtext("path") == theirs.findtext("path") == "host_device:/dev/vda"
    assert (ours.find("format").get("type"), theirs.find("format").get("type")) == ("qcow2", "raw")


def test_backing_chain_stops_at_a_store_that_is_no_file(real):
    """``--backing-chain`` opens nothing past the top (``/tmp/x``, ``/dev/vda``
    are never probed); the chain is complete, and the JSON says what the last
    image's backing reaches."""
    for file in ("fat.qcow2", "dev.qcow2", "null.qcow2", "dbg.qcow2"):
        chain = probe_chain(real / file)
        assert (len(chain.images), chain.error) == (1, None)
        cli = _cli("info", "--backing-chain", "--output", "json", real / file)
        assert cli.returncode == 0, cli.stderr
        [top] = json.loads(cli.stdout)
        assert top["storprobe"]["backing-store"]["reach"] == REAL_NAMES[file][1]["reach"]
        xml = _cli("info", "--backing-chain", "--output", "xml", real / file)
        assert xml.returncode == 0 and schema_errors(xml.stdout) == []


def test_a_scan_describes_volumes_whose_backing_qemu_refuses(real):
    cli = _cli("scan", "--output", "xml", real)
    assert (cli.returncode, cli.stderr) == (0, "")
    assert schema_errors(cli.stdout) == []
    volumes = etree.fromstring(cli.stdout.encode())
    assert [v.tag for v in volumes] == ["volume"] * len(REAL_NAMES)
    paths = {v.findtext("name"): v.findtext("backingStore/path") for v in volumes}
    assert paths["rbd.qcow2"] == "rbd:nopool" and paths["json.qcow2"] == 'json:{"file":'
    records = json.loads(_cli("scan", real).stdout)
    errors = {r["filename"].rsplit("/", 1)[1]: r["storprobe"]["backing-store"].get("error") for r in records}
    assert [f for f, e in sorted(errors.items()) if e] == ["json.qcow2", "rbd.qcow2"]


def test_only_a_plain_relative_name_is_relative_to_the_image(tmp_path, monkeypatch):
    """QEMU joins the image's directory to a plain relative name only: after
    ``file:`` or in ``json:`` a relative name is opened against QEMU's working
    directory (qemu-img run from elsewhere cannot find it), which no image can
    tell. Such a path stays relative, the chain stops there (``backing.relative``)
    and the XML shows the name as recorded, as virsh does."""
    qemu_img_create(tmp_path / "base.raw", "raw", "1M")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def qemu_opens_chain(image, cwd) -> bool:
        return subprocess.run([require("qemu-img"), "info", "--backing-chain", "-U", str(image)], cwd=cwd,
                              capture_output=True, check=False).returncode == 0

    for backing in ("file:base.raw", 'json:{"file":{"driver":"file","filename":"base.raw"}}'):
        image = _image_with_backing(tmp_path, "top.qcow2", backing)
        assert (qemu_opens_chain(image, tmp_path), qemu_opens_chain(image, elsewhere)) == (True, False)
        assert facts(parse_backing_name(backing, str(image))) == ("file", "file", "base.raw", (), None)
        chain = probe_chain(image)
        assert (len(chain.images), chain.error.code) == (1, "backing.relative")
        assert etree.fromstring(to_volume_xml(probe(image)).encode()).findtext("backingStore/path") == backing
    plain = _image_with_backing(tmp_path, "plain.qcow2", "base.raw")
    assert qemu_opens_chain(plain, elsewhere)
    assert parse_backing_name("base.raw", str(plain)).path == str(tmp_path / "base.raw")
    monkeypatch.chdir(tmp_path)  # a top image named relatively: its plain backing is still followed
    chain = probe_chain("plain.qcow2")
    assert (chain.error, [i.filename for i in chain.images]) == (None, ["plain.qcow2", "base.raw"])
    assert etree.fromstring(to_volume_xml(probe("plain.qcow2")).encode()).findtext("backingStore/path") == str(
        tmp_path / "base.raw")


# --- any name ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_info(tmp_path_factory) -> ImageInfo:
    """A real qcow2's description, its backing swapped in per example."""
    return probe(qemu_img_create(tmp_path_factory.mktemp("base") / "top.qcow2", "qcow2", "1M"))


@given(st.one_of(
    st.text(max_size=200),
    st.text(max_size=200).map(lambda s: "json:" + s),
    st.sampled_from(["nbd:", "rbd:", "nbd://", "iscsi://", "json:{\"file.", "fat:", "blkdebug:", "sheepdog:",
                     "gluster://", "nvme://"]).flatmap(lambda p: st.text(max_size=100).map(lambda s: p + s)),
))
def test_any_name_parses_or_is_a_named_error(base_info, name):
    """Any name parses or is a named error, and an image naming it renders:
    its volume XML describes the store (a name QEMU refuses as recorded)."""
    store = describe_backing_name(name, TOP)
    assert isinstance(store, RefusedName) or store.reach in REACHES
    info = base_info._replace(backing=Backing(name, "raw"))
    renders(info)
    try:
        to_volume_xml(info)
    except ProbeError as exc:  # a name XML cannot carry is the one error left
        assert exc.code == "xml.unrepresentable", exc
