#!/bin/busybox sh
# /init of Basalt's test guest (busybox in an initramfs; see mod.rs).
#
# Kernel command line:
#   basalt.ip=A.B.C.D basalt.gw=G   static address (/32), on-link gateway G
#   basalt.dhcp=1                   address and router from DHCP instead
#
# Services (busybox nc, one process per connection):
#   7   echo
#   8   disk read-back: "boots=N data=TEXT"
#   9   numbered stream: 0, 1, 2, ... one line every ~100 ms, forever
#   10  disk write: reads one line, stores it as the data record, says "ok"
#   11  memory dirtier: rewrites 8 MiB of RAM in a loop, one line a round,
#       while the reader stays connected
#
# Disk layout (/dev/vda, raw): block 0 holds the boot counter, block 1 the
# data record, each as one text line padded with zeros to 512 bytes.

/bin/busybox mkdir -p /proc /sys /dev /tmp /run
/bin/busybox mount -t devtmpfs devtmpfs /dev
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox --install -s /bin
exec </dev/console >/dev/console 2>&1
export PATH=/bin

say() { echo "basalt-guest: $*"; }

for m in $(cat /etc/basalt-modules); do
    [ -f "/lib/modules/$m.ko" ] || continue
    insmod "/lib/modules/$m.ko" || say "insmod $m failed"
done

# Waits up to $2 tenths of a second for path $1 to exist.
wait_for() {
    i=0
    while [ ! -e "$1" ] && [ "$i" -lt "$2" ]; do
        sleep 0.1
        i=$((i + 1))
    done
    [ -e "$1" ]
}

# A virtio block device (device id 0x0002) means a disk is coming.
has_disk=0
for d in /sys/bus/virtio/devices/*; do
    [ "$(cat "$d/device" 2>/dev/null)" = 0x0002 ] && has_disk=1
done
if [ "$has_disk" = 1 ]; then
    if wait_for /dev/vda 300; then
        boots=$(dd if=/dev/vda bs=512 count=1 2>/dev/null | tr -cd '0-9' | head -c 18)
        boots=$((${boots:-0} + 1))
        echo "$boots" | dd of=/dev/vda bs=512 count=1 conv=sync,fsync 2>/dev/null
        say "boot $boots"
    else
        say "no /dev/vda"
    fi
fi

ip=
gw=
dhcp=
for arg in $(cat /proc/cmdline); do
    case "$arg" in
    basalt.ip=*) ip=${arg#basalt.ip=} ;;
    basalt.gw=*) gw=${arg#basalt.gw=} ;;
    basalt.dhcp=1) dhcp=1 ;;
    esac
done

ip link set lo up
if wait_for /sys/class/net/eth0 300; then
    ip link set eth0 up
    if [ -n "$dhcp" ]; then
        # Returns once a lease is bound, then renews in the background.
        udhcpc -i eth0 -s /bin/basalt-dhcp -t 5 -T 1 -A 1 -S
    elif [ -n "$ip" ]; then
        ip addr add "$ip/32" dev eth0
        if [ -n "$gw" ]; then
            ip route add "$gw" dev eth0
            ip route add default via "$gw" dev eth0
        fi
    fi
else
    say "no eth0"
fi

nc -ll -p 7 -e cat &
nc -ll -p 8 -e /bin/basalt-read &
nc -ll -p 9 -e /bin/basalt-stream &
nc -ll -p 10 -e /bin/basalt-write &
nc -ll -p 11 -e /bin/basalt-dirty &

say "ready ip=$(ip -4 -o addr show dev eth0 2>/dev/null | awk '{print $4}')"

# PID 1 must never exit; `wait` also reaps the orphans that nc leaves.
while :; do
    wait
    sleep 1
done
