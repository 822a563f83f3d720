#!/bin/busybox sh
# SPDX-License-Identifier: GPL-2.0 OR MIT
#
# /init of the pvsched Linux test image (busybox).  Mounts the pseudo file
# systems, loads the pvsched module and runs the workload named on the
# kernel command line, printing results as one JSON object per line (each
# with a "type" key, as the test guest does), then powers off.
#
# Kernel command line keys:
#   pvsched.workload=selftest|cyclictest|device|shell   (default selftest)
#   pvsched.selftest=1     load the module in self-test mode (no device)
#   pvsched.module=0       do not load the module
#   pvsched.args="..."     extra module parameters, comma separated
#   pvsched.duration=<s>   cyclictest duration (default 5)
#   pvsched.interval=<us>  cyclictest interval (default 1000)
#   pvsched.policy=rr|other  cyclictest's threads: RR 8 (default) or SCHED_OTHER nice 0 (then only the
#                          timer interrupt and softirq that wake them mark their vCPU's slot)
#   pvsched.new_id=V:D     device workload: also bind the driver to PCI V:D
#   pvsched.end=poweroff|reboot   how the VM ends (default poweroff)
#   pvsched.hist=<us>      cyclictest histogram buckets of 1 us (default 20000; p50/p99 come from it)
#   pvsched.settle=<s>     cyclictest: seconds to wait after the module loads (default 0; the
#                          benchmark starts its host load at the boot record and lets it settle)
#   pvsched.quiesce=1      load and unload the module with every other CPU offline (set inside
#                          `pyvmm lab`: under QEMU's multi-threaded TCG, a text_poke_bp() of a tracepoint
#                          site that another vCPU runs can leave it looping on the int3 placed there)

/bin/busybox mkdir -p /bin /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
export PATH=/usr/local/bin:/bin:/sbin:/usr/bin:/usr/sbin

mount -t devtmpfs dev /dev
exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t debugfs debugfs /sys/kernel/debug
mount -t tmpfs tmp /tmp

MODULE=/lib/modules/pvsched.ko
DBG=/sys/kernel/debug/pvsched

# Value of pvsched.$1= on the kernel command line, else $2.
arg() {
	for w in $(cat /proc/cmdline); do
		case "$w" in
		pvsched."$1"=*) v="${w#*=}"; echo "${v//\"/}"; return ;;
		esac
	done
	echo "$2"
}

# Print `name value` lines of a file as one JSON object of type $1.
kv_json() {
	awk -v t="$1" 'BEGIN { printf "{\"type\":\"%s\"", t }
		{ printf ",\"%s\":%s", $1, ($2 ~ /^-?[0-9]+$/) ? $2 : "\"" $2 "\"" }
		END { print "}" }' "$2"
}

# Each slot line of debugfs pvsched/slots, wrapped with a phase label.
# Read from CPU 0 so that CPU 1 shows what it runs, not this reader.
slots_json() {
	taskset -c 0 cat $DBG/slots > /tmp/slots
	while read -r line; do
		echo "{\"type\":\"slot\",\"phase\":\"$1\",\"slot\":$line}"
	done < /tmp/slots
}

# The raw shared area (debugfs pvsched/shm) as hex, for the host's view.
shm_json() {
	hex=$(taskset -c 0 od -A n -t x1 -v $DBG/shm | tr -d ' \n')
	echo "{\"type\":\"shm\",\"phase\":\"$1\",\"hex\":\"$hex\"}"
}

# Wait (5 s at most) until process $1 runs sh: taskset and chrt exec'd.
wait_for_sh() {
	n=0
	while [ "$(cat /proc/"$1"/comm 2>/dev/null)" != sh ] && [ $n -lt 100 ]; do
		sleep 0.05
		n=$((n + 1))
	done
}

# The user processes (not kthreadd's children, not zombies) whose policy is not SCHED_OTHER, as one
# JSON record of phase $1: the slot samples that follow it may show only those as RT.
rt_tasks_json() {
	phase=$1 pids=
	for f in /proc/[0-9]*/stat; do
		read -r line < "$f" 2>/dev/null || continue
		# shellcheck disable=SC2086 # the fields after "(comm) " are words on purpose
		set -- ${line##*) }
		# $1 is stat's field 3 (state), $2 field 4 (ppid), ${39} field 41 (policy)
		[ "$1" != Z ] && [ "$2" != 2 ] && [ "${line%% *}" != 2 ] && [ "${39}" != 0 ] &&
			pids="$pids${pids:+,}${line%% *}"
	done
	echo "{\"type\":\"rt_tasks\",\"phase\":\"$phase\",\"pids\":[$pids]}"
}

# Phase $1 of the self-test: its RT user processes, then three slot samples 0.1 s apart.
sample_phase() {
	rt_tasks_json "$1"
	for _ in 1 2 3; do
		slots_json "$1"
		sleep 0.1
	done
}

# With pvsched.quiesce=1: write $1 (0 offline, 1 online) to every CPU's but CPU 0's online file.  The
# module's probes are then added and removed with one CPU running, so no other one can meet a site
# that text_poke_bp() is rewriting.  The module keeps a slot for every possible CPU, online or not.
other_cpus() {
	[ "$(arg quiesce 0)" = 1 ] || return 0
	for f in /sys/devices/system/cpu/cpu[1-9]*/online; do
		[ -e "$f" ] && echo "$1" > "$f"
	done
	echo "{\"type\":\"cpus\",\"online\":\"$(cat /sys/devices/system/cpu/online)\"}"
}

load_module() {
	params=$(echo "$(arg args '' | tr ',' ' ') $*" | sed 's/^ *//; s/ *$//')
	other_cpus 0
	# shellcheck disable=SC2086 # params are words on purpose
	insmod $MODULE $params
	rc=$?
	other_cpus 1
	echo "{\"type\":\"module\",\"event\":\"load\",\"rc\":$rc,\"params\":\"$params\"}"
	return $rc
}

unload_module() {
	other_cpus 0
	rmmod pvsched
	rc=$?
	other_cpus 1
	echo "{\"type\":\"module\",\"event\":\"unload\",\"rc\":$rc}"
}

dump_dmesg() {
	echo "=== dmesg begin"
	dmesg
	echo "=== dmesg end"
}

# Self-test: the module's probes on an area allocated without the device.
workload_selftest() {
	load_module selftest=1 || return 1
	kv_json info $DBG/info
	while read -r name state; do
		echo "{\"type\":\"tracepoint\",\"name\":\"$name\",\"state\":\"$state\"}"
	done < $DBG/tracepoints
	slots_json before

	# An RR 8 spinner pinned to CPU 1; sample CPU 1's slot from CPU 0 while
	# it runs.  It is killed once the samples are taken, never ended by a
	# clock: under TCG on a busy host the samples take seconds.  Nothing
	# else needs to bound it: this script is PID 1, so the kernel ends with
	# it, and the VM's runner kills the VM at its own timeout.
	# It must be the only RT process: busybox timeout left a watcher at RR 8
	# on CPU 1 that woke each second and outlived the spinner by up to one,
	# into the "after" samples.  chrt sets RR 8 on itself while it runs on
	# CPU 1 and execs the spinner, with no switch: the rt samples show RR 8
	# only because the module publishes a running task's new policy at the
	# next interrupt (timeout's vfork used to hide that, by a switch).
	# RT throttling off meanwhile: it would hand CPU 1 to others for 50 ms
	# of each second, at a random sample.
	rt_runtime=$(cat /proc/sys/kernel/sched_rt_runtime_us)
	echo -1 > /proc/sys/kernel/sched_rt_runtime_us
	taskset -c 1 chrt -r 8 sh -c 'while :; do :; done' &
	spinner=$!
	# Sample once it spins: its pid runs sh only after taskset and chrt exec'd.
	wait_for_sh $spinner
	sleep 0.2
	sample_phase rt
	shm_json rt
	# The rt samples hold only if the spinner was still running after them.
	kill -0 $spinner 2>/dev/null ||
		echo '{"type":"error","what":"the RT spinner ended before the rt samples were taken"}'
	kill $spinner 2>/dev/null
	wait $spinner
	sleep 0.3
	sample_phase after

	# A spinner started as SCHED_OTHER on CPU 1, made RR 8 from CPU 0 while
	# it runs (chrt -p, as an admin would): the change switches nothing on
	# CPU 1, so its slot shows RR 8 once an interrupt there publishes it.
	taskset -c 1 sh -c 'while :; do :; done' &
	promoted=$!
	wait_for_sh $promoted
	sleep 0.2
	slots_json other
	taskset -c 0 chrt -r -p 8 $promoted
	sleep 0.2
	sample_phase promoted
	kill $promoted 2>/dev/null
	wait $promoted
	echo "$rt_runtime" > /proc/sys/kernel/sched_rt_runtime_us

	# Cross-CPU RT wakeups: an RR reader on CPU 1 woken by a writer on CPU 0.
	mkfifo /tmp/fifo
	taskset -c 1 chrt -r 8 sh -c 'while read -r _; do :; done' < /tmp/fifo &
	reader=$!
	taskset -c 0 sh -c 'for i in 1 2 3 4 5 6 7 8 9 10; do echo $i; sleep 0.05; done' > /tmp/fifo
	wait $reader

	kv_json stats $DBG/stats
	unload_module
	[ -e $DBG ] && echo '{"type":"error","what":"debugfs pvsched left after unload"}'
	# A second load/unload cycle: unload must have left nothing behind.
	load_module selftest=1 && sleep 0.2 && unload_module
	dump_dmesg
}

# cyclictest on every CPU at RR 8 (the benchmark's guest workload), or at SCHED_OTHER.
workload_cyclictest() {
	duration=$(arg duration 5)
	interval=$(arg interval 1000)
	case "$(arg policy rr)" in
	other) prio="-p 0 --policy=other" ;;
	*) prio="-p 8 --policy=rr" ;;
	esac
	if [ "$(arg module 1)" = 1 ]; then
		if [ "$(arg selftest 0)" = 1 ]; then
			load_module selftest=1
		else
			load_module
		fi
	fi
	settle=$(arg settle 0)
	[ "$settle" = 0 ] || sleep "$settle"
	# shellcheck disable=SC2086  # $prio is two options
	cyclictest --mlockall -q $prio -i "$interval" -D "$duration" \
		-t "$(nproc)" -a -h "$(arg hist 20000)" --json=/tmp/cyclictest.json > /tmp/cyclictest.out 2>&1
	rc=$?
	# The benchmark's window closes here: what follows (the summary, slow under emulation) is not measured.
	echo '{"type":"cyclictest_end"}'
	# The 1-us histogram stays here: printed, it would be tens of KB, and every byte to the UART is a VM
	# exit (seconds with interrupts off on a slow host).  The record carries the all-thread percentiles
	# (upper bucket edges, overflows at the max) and cyclictest's JSON without the histogram.
	summary=$(awk '
		/^[0-9]+[ \t]/ { c = 0; for (i = 2; i <= NF; i++) c += $i
			if (c > 0) { h[$1 + 0] += c; if ($1 + 0 > top) top = $1 + 0 }; n += c; next }
		/^# Histogram Overflows:/ { for (i = 4; i <= NF; i++) ovf += $i }
		/^# Min Latencies:/ { mn = -1; for (i = 4; i <= NF; i++) if (mn < 0 || $i + 0 < mn) mn = $i + 0 }
		/^# Avg Latencies:/ { s = 0; k = 0; for (i = 4; i <= NF; i++) { s += $i; k++ }; avg = k ? s / k : 0 }
		/^# Max Latencies:/ { for (i = 4; i <= NF; i++) if ($i + 0 > mx) mx = $i + 0 }
		function pct(q,   b, seen) { seen = 0
			for (b = 0; b <= top; b++) { seen += h[b]; if (seen >= q * (n + ovf)) return (b + 1 < mx) ? b + 1 : mx }
			return mx }
		END { if (n + ovf == 0) { print "null"; exit }
			printf "{\"min\":%d,\"avg\":%.2f,\"p50\":%d,\"p99\":%d,\"max\":%d,\"samples\":%d,\"overflows\":%d}",
				mn, avg, pct(0.5), pct(0.99), mx, n + ovf, ovf }' /tmp/cyclictest.out 2>/dev/null)
	result=$(sed '/"histogram": {/,/},/d' /tmp/cyclictest.json 2>/dev/null | tr -d '\n')
	echo "{\"type\":\"cyclictest\",\"rc\":$rc,\"summary\":${summary:-null},\"result\":${result:-null}}"
	[ $rc -ne 0 ] && cat /tmp/cyclictest.out
	[ -e $DBG/stats ] && kv_json stats $DBG/stats
	dump_dmesg
}

# Device mode: bind the pvsched device, report, unbind (negotiation check).
# pvsched.new_id=VVVV:DDDD also offers the driver another PCI id (tests of
# the probe's error unwinding against a device that is not pvsched).
workload_device() {
	load_module || { dump_dmesg; return 1; }
	newid=$(arg new_id '')
	[ -n "$newid" ] && echo "$newid" | tr ':' ' ' > /sys/bus/pci/drivers/pvsched/new_id
	if [ -e $DBG/info ]; then
		echo '{"type":"pvsched","status":"active"}'
		kv_json info $DBG/info
		sleep 1
		slots_json device
		kv_json stats $DBG/stats
	else
		echo '{"type":"pvsched","status":"unbound"}'
	fi
	echo "{\"type\":\"iomem\",\"pvsched_regions\":$(grep -c pvsched /proc/iomem)}"
	unload_module
	dump_dmesg
}

workload_shell() {
	if [ "$(arg module 1)" = 1 ]; then
		if [ "$(arg selftest 0)" = 1 ]; then
			load_module selftest=1
		else
			load_module
		fi
	fi
	setsid cttyhack sh
}

workload=$(arg workload selftest)
echo "{\"type\":\"boot\",\"kernel\":\"$(uname -r)\",\"cpus\":$(nproc),\"workload\":\"$workload\"}"
case "$workload" in
selftest) workload_selftest ;;
cyclictest) workload_cyclictest ;;
device) workload_device ;;
shell) workload_shell ;;
*) echo "{\"type\":\"error\",\"what\":\"unknown workload $workload\"}" ;;
esac
echo '{"type":"done"}'
# poweroff -f does not wait for the tty: what the serial driver still holds would be lost.  Setting the
# console's own settings again (tcsetattr TCSADRAIN) returns once its output is sent.
stty -F /dev/console "$(stty -F /dev/console -g)"
if [ "$(arg end poweroff)" = reboot ]; then
	reboot -f
else
	poweroff -f
fi
