#!/usr/bin/env python3
"""Measure how the chunk size trades compression against over-fetch.

For a real file tree (default: /usr/lib/python3* + /usr/share/locale-ish content), build the
erofs image once, chunk it at several sizes with `lazyblk build`, and report: blob size,
manifest size, and the blob bytes a lazy reader must fetch to read a random 10% of the files
(estimated from the files' physical extents, via FIEMAP on a read-only loop mount of the image,
plus the chunks holding the inode/dirent metadata of the first 64 KiB). Needs root (loop mount).
Usage: bench/chunk-size.py [tree] ; prints a markdown table.
"""
import fcntl, glob, os, random, struct, subprocess, sys, tempfile

LAZYBLK = os.environ.get("LAZYBLK", "target/release/lazyblk")

def fiemap(path):
    FS_IOC_FIEMAP = 0xC020660B
    n = 64
    hdr = struct.pack("=QQLLLL", 0, 0xFFFFFFFFFFFFFFFF, 0, 0, n, 0)
    buf = bytearray(hdr + b"\0" * (56 * n))
    with open(path, "rb") as f:
        fcntl.ioctl(f, FS_IOC_FIEMAP, buf)
    count = struct.unpack_from("=L", buf, 20)[0]
    out = []
    for i in range(count):
        logical, physical, length = struct.unpack_from("=QQQ", buf, 32 + 56 * i)
        out.append((physical, length))
    return out

def manifest_stored(path):
    b = open(path, "rb").read()
    chunk = struct.unpack_from("<I", b, 16)[0]
    n, uniq = struct.unpack_from("<QQ", b, 32)
    name_len = struct.unpack_from("<H", b, 56)[0]
    map_at = (64 + name_len + 7) // 8 * 8
    ent_at = (map_at + 4 * n + 7) // 8 * 8
    lens = [struct.unpack_from("<I", b, ent_at + 48 * k + 40)[0] for k in range(uniq)]
    m = struct.unpack_from("<%dI" % n, b, map_at)
    return chunk, [0 if k == 0 else lens[k - 1] for k in m], [k for k in m], len(b)

def main():
    tree = sys.argv[1] if len(sys.argv) > 1 else None
    work = tempfile.mkdtemp(prefix="lzbench-")
    if tree is None:
        tree = os.path.join(work, "tree")
        os.makedirs(tree)
        for src in glob.glob("/usr/lib/python3*/") + ["/usr/share/perl/", "/usr/include/"]:
            if os.path.isdir(src):
                subprocess.run(["cp", "-a", src, os.path.join(tree, os.path.basename(src.rstrip("/")))], check=True)
    img = os.path.join(work, "image.erofs")
    subprocess.run(["mkfs.erofs", "--quiet", img, tree], check=True)
    mnt = os.path.join(work, "mnt"); os.makedirs(mnt)
    subprocess.run(["mount", "-o", "loop,ro", "-t", "erofs", img, mnt], check=True)
    try:
        files = [os.path.join(d, f) for d, _, fs in os.walk(mnt) for f in fs
                 if os.path.isfile(os.path.join(d, f)) and not os.path.islink(os.path.join(d, f))]
        random.seed(7)
        pick = random.sample(files, max(1, len(files) // 10))
        extents = [e for f in pick for e in fiemap(f)]
        want = sum(os.path.getsize(f) for f in pick)
    finally:
        subprocess.run(["umount", mnt])
    size = os.path.getsize(img)
    print(f"tree: {tree}, image {size/2**20:.1f} MiB, {len(files)} files; reading {len(pick)} files ({want/2**20:.2f} MiB)\n")
    print("| chunk | blob MiB | blob/image | manifest KiB | fetched for 10% of files (MiB) | amplification |")
    print("|---|---|---|---|---|---|")
    for kib in [16, 64, 128, 256, 512, 1024, 4096]:
        out = os.path.join(work, f"c{kib}")
        subprocess.run([LAZYBLK, "build", img, "-o", out, "--chunk-kib", str(kib)], check=True, stdout=subprocess.DEVNULL)
        chunk, stored, mp, mlen = manifest_stored(os.path.join(out, "manifest"))
        touched = set(range(0, (65536 + chunk - 1) // chunk))  # superblock + metadata head
        for phys, length in extents:
            for c in range(phys // chunk, (phys + max(length, 1) - 1) // chunk + 1):
                touched.add(c)
        uniq = {mp[c]: stored[c] for c in touched if c < len(mp) and mp[c] != 0}
        fetched = sum(uniq.values())
        blob = os.path.getsize(os.path.join(out, "blob"))
        print(f"| {kib} KiB | {blob/2**20:.1f} | {blob/size:.2f} | {mlen/1024:.1f} | {fetched/2**20:.2f} | {fetched/max(want,1):.2f}x |")
    subprocess.run(["rm", "-rf", work])

main()
