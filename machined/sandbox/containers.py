"""Containers to try machined with inside a sandbox: a booted OS without an OS tree of its own.

``boot_container NAME`` (a bash function) boots systemd-nspawn with systemd and dbus
inside, on a copy-on-write overlay of the host's OS whose writes go to the
sandbox's /tmp, with a veth pair and a small target (dbus, logind) instead of the
host's default services. The tests and ``make run`` share it.
"""

BASH_FUNCTIONS = r"""
# (the waits end as soon as the condition holds; their limits only matter on a loaded machine)
# until_listed NAME: wait until machine NAME is registered
# (systemd-nspawn's payload starts only once its registration is answered: when the leader is
# still nspawn's child, wait for that too, or a restart of the daemon could catch the call)
until_listed() {
  local l
  for _ in $(seq 600); do
    if l=$(machinectl show "$1" -p Leader --value 2>/dev/null); then
      for _ in $(seq 600); do [ "$(cat /proc/$l/comm 2>/dev/null)" = systemd-nspawn ] || return 0; sleep 0.05; done
      return 0
    fi
    sleep 0.05
  done
  echo "never registered: $1"
}
# gone NAME: wait until machine NAME is no longer registered
gone() {
  for _ in $(seq 600); do machinectl show "$1" >/dev/null 2>&1 || return 0; sleep 0.05; done
  echo "still registered: $1"
}
# boot_container NAME: a booted container (systemd, dbus and logind inside, a veth)
boot_container() {
  local d=/var/lib/machines/$1 o=/tmp/ov-$1
  mkdir -p $d $o/upper/etc/systemd/system $o/work
  printf '[Unit]\nDescription=Sandbox container target\nWants=dbus.socket systemd-logind.service\nAfter=dbus.socket\n' \
    > $o/upper/etc/systemd/system/sandbox-container.target
  mountpoint -q $d || mount -t overlay overlay -o lowerdir=/,upperdir=$o/upper,workdir=$o/work $d
  systemd-run --quiet --unit=boot-$1 \
    systemd-nspawn -q -b -D $d --network-veth -M $1 systemd.unit=sandbox-container.target
  until_listed $1
  for _ in $(seq 600); do
    case "$(systemctl -M $1 is-system-running 2>/dev/null)" in running|degraded) return 0;; esac
    sleep 0.1
  done
  echo "container $1 did not boot"
}
# login_prompt NAME: `machinectl login NAME` until the prompt shows (at most 30 s); prints "login:"
# when it did. Then the container's getty is stopped: systemd restarts it on its pty's number
# once the session hangs up, and it would share that pty with whatever opens the number next.
login_prompt() {
  local out=/tmp/login-$1.out p
  : > $out  # (made before the loop reads it: the background job may open it later)
  timeout 30 script -qec "machinectl login $1" /dev/null < /dev/null > $out 2>&1 & p=$!
  for _ in $(seq 300); do grep -aq 'login:' $out && break; sleep 0.1; done
  kill $p 2>/dev/null; wait $p 2>/dev/null
  tr -d '\r' < $out | grep -a -m1 -o 'login:'; rm -f $out
  systemctl -M $1 stop 'container-getty@*.service' 2>/dev/null
}
# stop_container NAME
stop_container() { machinectl terminate $1 2>/dev/null; gone $1; umount /var/lib/machines/$1 2>/dev/null; }
"""
