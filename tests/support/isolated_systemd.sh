#!/bin/bash
# Boots a real systemd as PID 1 of new PID, mount, UTS and IPC namespaces, with only the
# units a test starts. Run as:
#   unshare --pid --fork --kill-child --mount --mount-proc --uts --ipc \
#       bash isolated_systemd.sh REPO
#
# The file system is shared with the host, and systemd, left to itself, changes it:
# sysinit.target's systemd-tmpfiles-setup.service empties /tmp (on CI that can be the
# checkout), and mounting its cgroup tree remounts the host's /sys/fs/cgroup read-only.
# So, before systemd starts:
#   - /etc, /opt, /var and /usr/local are overlays whose writes land in this namespace's
#     /run: `make install` (run here, as an operator runs it) and the service's state
#     directory change nothing on the host;
#   - /tmp and /var/tmp are fresh tmpfs mounts, so nothing here can empty the host's;
#   - /sys/fs/cgroup is a fresh tmpfs with the host's hierarchies bound into it (the
#     cgroups themselves are the host's: freezing a job's cgroup is real);
#   - every target and early service is masked, and the unit's default dependencies are
#     off (a drop-in): only what a test starts runs.
# systemd as PID 1 also raises two host-wide sysctls (net.unix.max_dgram_qlen of the shared
# network namespace, fs.file-max); the caller restores them. It keeps a canary file in the
# host's /tmp and checks it is still there.
set -euo pipefail
REPO=$1

mount --make-rprivate /
mount -t tmpfs -o mode=0755 tmpfs /run
# the checkout may be under /tmp (hidden below) or an overlaid directory: keep it in
# view, under an overlay, so that building it (pip's build/, *.egg-info) leaves it as it is
mkdir -p /run/governor-src /run/overlay/src/upper /run/overlay/src/work
mount -t overlay overlay \
    -o "lowerdir=$REPO,upperdir=/run/overlay/src/upper,workdir=/run/overlay/src/work" \
    /run/governor-src
mkdir -p /run/overlay
for dir in etc opt var usr/local; do
    name=${dir//\//_}
    mkdir -p "/run/overlay/$name/upper" "/run/overlay/$name/work"
    mount -t overlay overlay \
        -o "lowerdir=/$dir,upperdir=/run/overlay/$name/upper,workdir=/run/overlay/$name/work" "/$dir"
done
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /var/tmp

mkdir -p /run/host-cgroup
mount --rbind /sys/fs/cgroup /run/host-cgroup
mount -t tmpfs -o mode=0755 tmpfs /sys/fs/cgroup
for hierarchy in /run/host-cgroup/*; do
    [ -d "$hierarchy" ] && [ ! -L "$hierarchy" ] || continue
    target=/sys/fs/cgroup/$(basename "$hierarchy")
    mkdir -p "$target"
    mount --bind "$hierarchy" "$target"
done
umount -l /run/host-cgroup

mkdir -p /run/governor-test
cd /run/governor-src
if ! make install PYTHON=/usr/bin/python3 >/run/governor-test/install.log 2>&1; then
    cat /run/governor-test/install.log >&2
    exit 1
fi

units=/run/systemd/system
mkdir -p "$units/governor.service.d"
for target in sysinit basic sockets timers paths local-fs remote-fs swap cryptsetup \
              network network-online network-pre nss-lookup multi-user default getty \
              graphical emergency rescue; do
    ln -s /dev/null "$units/$target.target"
done
for unit in systemd-tmpfiles-setup systemd-tmpfiles-setup-dev systemd-tmpfiles-clean \
            systemd-sysctl systemd-journald systemd-udevd systemd-udev-trigger \
            systemd-remount-fs systemd-random-seed systemd-timesyncd systemd-pstore \
            systemd-journal-flush systemd-update-utmp systemd-logind dbus; do
    ln -s /dev/null "$units/$unit.service"
done
# The unit's [Service] section is what is tested: only its default dependencies are off,
# and its output goes to a file, there being no journald here.
cat > "$units/governor.service.d/isolated.conf" <<UNIT
[Unit]
DefaultDependencies=no
[Service]
StandardOutput=append:/run/governor-test/daemon.log
StandardError=inherit
UNIT
printf '[Unit]\nDescription=governor tests\nDefaultDependencies=no\n' > "$units/test.target"

export container=unshare
exec /lib/systemd/systemd --unit=test.target
