"""A throwaway Linux VM (Debian's kernel under QEMU) that runs a script over this machine's own files.

The machine the suite runs on may lack kernel modules a test needs (here: the
in-kernel WireGuard). Debian's kernel package carries them, and QEMU's pure
emulation (TCG) boots it anywhere, so a test can get a real kernel in a minute:

1. :func:`build` downloads ``linux-image-<version>-amd64`` once with ``apt-get
   download`` (nothing is installed), unpacks it, asks ``modprobe --show-depends``
   for the modules to load (:data:`MODULES` and their dependencies, in order) and
   writes a tiny initramfs: busybox (``busybox-static``), those modules
   (decompressed: busybox's ``insmod`` reads plain ``.ko`` only) and an ``/init``.
   Everything is cached in :func:`cache_dir` (outside the git tree), keyed by the
   package and by this recipe, so a second run downloads and builds nothing.
2. :func:`boot` starts ``qemu-system-x86_64 -accel tcg``. The guest's ``/init``
   loads the modules, mounts this machine's ``/`` read-only over virtio-9p and a
   read-write *scratch* folder of the caller's beside it, chroots into the former
   (own ``/proc``, ``/sys``, ``/dev``, tmpfs on ``/tmp`` and ``/run``, ``lo`` up)
   and runs ``/bin/sh <scratch>/run.sh`` there, so the project's own ``.venv``,
   mosquitto, ``wg``, ``ip`` and ``bridge`` run unchanged on the guest kernel.
   Output goes to ``<scratch>/guest.log``, the exit status to
   ``<scratch>/exit-status``; then the guest powers off.

Emulation is 10-50x slower than native: size guest work accordingly.

Example::

    images = build()                          # VMUnavailable says why it cannot
    with open(os.path.join(scratch, "run.sh"), "w") as f:
        f.write("uname -r; wg --version\\n")
    result = boot(images, scratch, timeout=120)
    result.exit_status, result.console        # 0, the serial console's text
"""

from __future__ import annotations

import fcntl
import glob
import gzip
import hashlib
import lzma
import os
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

#: Where built images are kept unless ``$WGKEX_KERNEL_VM_CACHE`` says otherwise.
DEFAULT_CACHE = "/var/cache/wgkex-kernel-vm"
#: Kernel modules the guest loads (with their dependencies): 9p over virtio for the
#: shared folders, then what wgkex and its tests use.
MODULES = ("virtio_pci", "9pnet_virtio", "9p", "wireguard", "vxlan", "veth")
#: Debian's meta package whose dependency names the current kernel image package.
META_PACKAGE = "linux-image-amd64"
QEMU = "qemu-system-x86_64"
BUSYBOX = "/bin/busybox"
#: Mount point of the scratch share inside the chroot (``/run`` is a tmpfs there).
GUEST_SCRATCH = "/run/scratch"

_NINEP = "trans=virtio,version=9p2000.L,msize=262144"

#: The guest's ``/init`` (busybox sh). ``@SCRATCH@`` is :data:`GUEST_SCRATCH`.
INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
while read -r m; do insmod "/lib/modules/$m" || echo "wgkex-vm: insmod $m failed"; done < /modules.load
R=/newroot
mkdir -p $R
if ! mount -t 9p -o ro,cache=loose,@NINEP@ hostroot $R; then
  echo "wgkex-vm: cannot mount the host's / over 9p"; poweroff -f
fi
mount -t proc proc $R/proc
mount -t sysfs sys $R/sys
mount -t devtmpfs dev $R/dev
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts devpts $R/dev/pts
mount -t tmpfs shm $R/dev/shm
ln -sf /proc/self/fd $R/dev/fd
ln -sf /proc/self/fd/0 $R/dev/stdin
ln -sf /proc/self/fd/1 $R/dev/stdout
ln -sf /proc/self/fd/2 $R/dev/stderr
mount -t tmpfs tmp $R/tmp
mount -t tmpfs run $R/run
# The project may live under /tmp or /run (a CI clone), which the tmpfs mounts above hide:
# its own share goes back on top at the same path (wgkex_project= on the kernel command line).
for arg in $(cat /proc/cmdline); do case "$arg" in wgkex_project=*) P="${arg#wgkex_project=}";; esac; done
if [ -n "$P" ]; then
  mkdir -p "$R$P" 2>/dev/null
  mount -t 9p -o ro,cache=loose,@NINEP@ project "$R$P" || echo "wgkex-vm: cannot mount the project at $P"
fi
mkdir -p $R@SCRATCH@
mount -t 9p -o @NINEP@ scratch $R@SCRATCH@
hostname wgkex-vm
chroot $R ip link set lo up
echo "wgkex-vm: running @SCRATCH@/run.sh"
chroot $R /bin/sh -c 'cd @SCRATCH@ && exec /bin/sh ./run.sh' > $R@SCRATCH@/guest.log 2>&1
echo $? > $R@SCRATCH@/exit-status
echo "wgkex-vm: run.sh exited with status $(cat $R@SCRATCH@/exit-status)"
sync
umount $R@SCRATCH@
poweroff -f
""".replace("@SCRATCH@", GUEST_SCRATCH).replace("@NINEP@", _NINEP)


class VMUnavailable(Exception):
    """The VM cannot run on this machine; the message says why (a test skip reason)."""


@dataclass(frozen=True)
class Images:
    """A bootable kernel and its initramfs."""

    kernel: str
    initramfs: str
    version: str


@dataclass(frozen=True)
class BootResult:
    """What a boot left behind."""

    exit_status: int | None  # of run.sh; None if it never finished
    console: str  # the serial console
    console_path: str
    seconds: float
    timed_out: bool


def cache_dir() -> str:
    return os.environ.get("WGKEX_KERNEL_VM_CACHE") or DEFAULT_CACHE


def why_unavailable() -> str | None:
    """Why this machine cannot build or boot the VM (missing root or tools), or None."""
    if os.geteuid() != 0:
        return "needs root (to write the VM image cache and run the guest's netlink tests; CI runs as root)"
    for tool, package in ((QEMU, "qemu-system-x86"), ("modprobe", "kmod"), ("depmod", "kmod"),
                          ("apt-get", "apt"), ("dpkg-deb", "dpkg")):
        if shutil.which(tool) is None:
            return f"needs {tool} (apt-get install --no-install-recommends {package}; `make deps` does this)"
    if not os.path.exists(BUSYBOX):
        return "needs a static busybox (apt-get install --no-install-recommends busybox-static; `make deps` does this)"
    return None


def _run(argv: Sequence[str], cwd: str | None = None, timeout: float = 300) -> str:
    try:
        done = subprocess.run(list(argv), cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise VMUnavailable(f"{' '.join(argv)} did not finish within {timeout:g} s") from None
    if done.returncode != 0:
        raise VMUnavailable(f"{' '.join(argv)} failed (exit status {done.returncode}): "
                            f"{(done.stderr or done.stdout).strip()[-500:]}")
    return done.stdout


def kernel_package() -> str:
    """The kernel image package to use: ``$WGKEX_KERNEL_PACKAGE``, else the one linux-image-amd64 depends on."""
    chosen = os.environ.get("WGKEX_KERNEL_PACKAGE")
    if chosen:
        return chosen
    try:
        out = _run(["apt-cache", "depends", META_PACKAGE], timeout=60)
    except VMUnavailable:
        out = ""
    for line in out.splitlines():
        name = line.split(":", 1)[-1].strip()
        if line.strip().startswith("Depends:") and name.startswith("linux-image-") and name.endswith("-amd64"):
            return name
    # No package lists (apt-get update never ran): a kernel downloaded earlier still serves.
    cached = sorted(glob.glob(os.path.join(cache_dir(), "debs", "linux-image-*-amd64_*.deb")))
    if cached:
        return os.path.basename(cached[-1]).split("_", 1)[0]
    raise VMUnavailable(f"apt knows no {META_PACKAGE} (run apt-get update) and no kernel is cached in {cache_dir()}")


@contextmanager
def _locked(directory: str) -> Iterator[None]:
    """Hold ``directory/lock`` so that two test processes never build the same images at once."""
    with open(os.path.join(directory, "lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _download(package: str, debs: str) -> str:
    """The package's .deb in ``debs``, downloaded unless already there."""
    found = sorted(glob.glob(os.path.join(debs, f"{package}_*.deb")))
    if found:
        return found[-1]
    partial = tempfile.mkdtemp(prefix="download-", dir=debs)
    try:
        # The cache is root's: let apt fetch as root instead of its sandbox user.
        _run(["apt-get", "-q", "-o", "APT::Sandbox::User=root", "download", package], cwd=partial)
        got = glob.glob(os.path.join(partial, f"{package}_*.deb"))
        if len(got) != 1:
            raise VMUnavailable(f"apt-get download {package} left no .deb in {partial}")
        final = os.path.join(debs, os.path.basename(got[0]))
        os.rename(got[0], final)
        return final
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def _recipe_digest(deb: str) -> str:
    """Names the images: the .deb, this recipe (init, modules) and the busybox binary."""
    h = hashlib.sha256()
    h.update(os.path.basename(deb).encode())
    h.update(INIT.encode())
    h.update(" ".join(MODULES).encode())
    with open(BUSYBOX, "rb") as f:
        h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()[:16]


def build() -> Images:
    """The kernel and initramfs for :func:`boot`, from the cache or built now (see the module docstring)."""
    reason = why_unavailable()
    if reason:
        raise VMUnavailable(reason)
    root = cache_dir()
    debs = os.path.join(root, "debs")
    os.makedirs(debs, exist_ok=True)
    with _locked(root):
        package = kernel_package()
        deb = _download(package, debs)
        version = package[len("linux-image-"):]
        out = os.path.join(root, f"{version}-{_recipe_digest(deb)}")
        images = Images(os.path.join(out, "vmlinuz"), os.path.join(out, "initramfs.cpio"), version)
        if os.path.exists(images.initramfs):
            return images
        work = tempfile.mkdtemp(prefix="build-", dir=root)
        try:
            tree = os.path.join(work, "tree")
            _run(["dpkg-deb", "-x", deb, tree])
            _run(["depmod", "-b", tree, version])
            staged = os.path.join(work, "out")
            os.makedirs(staged)
            shutil.copyfile(os.path.join(tree, "boot", f"vmlinuz-{version}"), os.path.join(staged, "vmlinuz"))
            with open(os.path.join(staged, "initramfs.cpio"), "wb") as f:
                f.write(_initramfs(tree, version))
            shutil.rmtree(out, ignore_errors=True)
            os.rename(staged, out)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return images


def _module_files(tree: str, version: str) -> list[str]:
    """Paths (inside ``tree``) of :data:`MODULES` and their dependencies, in load order, each once."""
    ordered: list[str] = []
    for module in MODULES:
        out = _run(["modprobe", "-d", tree, "-S", version, "--show-depends", module])
        for line in out.splitlines():
            parts = line.split()
            if parts[:1] == ["builtin"]:
                continue
            if parts[:1] != ["insmod"] or len(parts) < 2:
                raise VMUnavailable(f"modprobe --show-depends {module}: unexpected line {line!r}")
            if parts[1] not in ordered:
                ordered.append(parts[1])
    return ordered


def _read_module(path: str) -> bytes:
    with open(path, "rb") as f:
        data = f.read()
    if path.endswith(".xz"):
        return lzma.decompress(data)
    if path.endswith(".gz"):
        return gzip.decompress(data)
    if path.endswith(".ko"):
        return data
    raise VMUnavailable(f"cannot decompress kernel module {path} (only .ko, .ko.xz and .ko.gz are handled)")


def _initramfs(tree: str, version: str) -> bytes:
    """An uncompressed newc cpio archive: busybox, the modules, ``/modules.load`` and ``/init``."""
    archive = _Cpio()
    for d in ("bin", "dev", "proc", "sys", "newroot", "lib", "lib/modules"):
        archive.directory(d)
    archive.device("dev/console", major=5, minor=1)
    with open(BUSYBOX, "rb") as f:
        archive.file("bin/busybox", f.read(), 0o755)
    archive.symlink("bin/sh", "busybox")
    names = []
    for path in _module_files(tree, version):
        name = os.path.basename(path)
        for suffix in (".xz", ".gz"):
            name = name.removesuffix(suffix)
        archive.file(f"lib/modules/{name}", _read_module(path), 0o644)
        names.append(name)
    archive.file("modules.load", "".join(n + "\n" for n in names).encode(), 0o644)
    archive.file("init", INIT.encode(), 0o755)
    return archive.finish()


class _Cpio:
    """The "newc" cpio format the kernel unpacks an initramfs from."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        fields = [self._ino, mode, 0, 0, 2 if stat.S_ISDIR(mode) else 1, 0, len(data), 0, 0,
                  rdev[0], rdev[1], len(name) + 1, 0]
        self._ino += 1
        header = b"070701" + b"".join(b"%08X" % v for v in fields)
        self._parts.append(_pad4(header + name.encode() + b"\0"))
        self._parts.append(_pad4(data))

    def directory(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def device(self, name: str, major: int, minor: int) -> None:
        self._entry(name, stat.S_IFCHR | 0o600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return b"".join(self._parts)


def _pad4(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 4)


def qemu_argv(images: Images, scratch: str, memory_mb: int = 2048, cpus: int = 2,
              project: str | None = None) -> list[str]:
    """The QEMU command line: pure emulation (no KVM needed), serial console on stdout, no network card.

    ``project`` (a folder without spaces) is shared read-only once more and mounted at
    the same path in the guest, so that a checkout under ``/tmp`` or ``/run`` stays
    visible above the guest's own tmpfs there.
    """
    append = "console=ttyS0 panic=-1 quiet"
    shares = [
        "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
        "-virtfs", f"local,path={scratch},mount_tag=scratch,security_model=none,multidevs=remap",
    ]
    if project is not None:
        append += f" wgkex_project={project}"
        shares += ["-virtfs", f"local,path={project},mount_tag=project,security_model=none,readonly=on,multidevs=remap"]
    return [
        QEMU, "-accel", "tcg", "-cpu", "max", "-m", str(memory_mb), "-smp", str(cpus),
        "-nographic", "-no-reboot", "-nic", "none", "-monitor", "none",
        "-kernel", images.kernel, "-initrd", images.initramfs,
        "-append", append,
        *shares,
    ]


def boot(images: Images, scratch: str, timeout: float, project: str | None = None) -> BootResult:
    """Boot, let the guest run ``<scratch>/run.sh``, wait for the power-off (killing QEMU at ``timeout``).

    ``project``: the checkout the guest runs from (see :func:`qemu_argv`).
    """
    console_path = os.path.join(scratch, "console.log")
    status_path = os.path.join(scratch, "exit-status")
    if os.path.exists(status_path):
        os.unlink(status_path)
    start = time.monotonic()
    timed_out = False
    with open(console_path, "wb") as console:
        qemu = subprocess.Popen(qemu_argv(images, scratch, project=project), stdin=subprocess.DEVNULL, stdout=console,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            qemu.wait(timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            qemu.kill()  # our own child, by its PID
            qemu.wait()
    seconds = time.monotonic() - start
    with open(console_path, errors="replace") as f:
        text = f.read()
    status: int | None = None
    try:
        with open(status_path) as f:
            status = int(f.read().strip())
    except (OSError, ValueError):
        pass
    return BootResult(status, text, console_path, seconds, timed_out)
