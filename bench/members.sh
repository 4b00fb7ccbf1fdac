# Sourced by the [ha] bench scripts (takeover.sh, switchover.sh): one etcd member and two Chorus
# members, a and b, in front of the peers' two servers (bench/peers.sh first). Set before
# sourcing: work (a directory), ETCD_PORT (client; the peer port is the next one), PORT_A and
# PORT_B (client ports; each admin API is ten up), CLUSTER (the group's name).
etcd --name "$CLUSTER" --data-dir "$work/etcd" --listen-client-urls "http://127.0.0.1:$ETCD_PORT" \
  --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" --listen-peer-urls "http://127.0.0.1:$((ETCD_PORT + 1))" \
  --initial-advertise-peer-urls "http://127.0.0.1:$((ETCD_PORT + 1))" \
  --initial-cluster "$CLUSTER=http://127.0.0.1:$((ETCD_PORT + 1))" >"$work/etcd.log" 2>&1 &
etcd_pid=$!
declare -A pid port
port[a]=$PORT_A port[b]=$PORT_B
config() {
  printf 'listen = "127.0.0.1:%s"\nadmin_listen = "127.0.0.1:%s"\nadmin_token = "bench"\ndata_dir = "%s"\nhealth_check_database = "bench"\n[auth]\nmethod = "trust"\n[[users]]\nname = "postgres"\n[[backends]]\nname = "pg1"\nhost = "127.0.0.1"\nport = %s\n[[backends]]\nname = "pg2"\nhost = "127.0.0.1"\nport = %s\n[ha]\netcd_endpoints = ["http://127.0.0.1:%s"]\ncluster = "%s"\nnode_name = "%s"\n' \
    "${port[$1]}" "$((port[$1] + 10))" "$work/$1" "$PG_A" "$PG_B" "$ETCD_PORT" "$CLUSTER" "$1" >"$work/$1.toml"
}
start() { CHORUS_LOG=info target/release/chorus --config "$work/$1.toml" >>"$work/$1.log" 2>&1 & pid[$1]=$!; }
leader() { for m in a b; do curl -sf "http://127.0.0.1:$((port[$m] + 10))/leader" >/dev/null 2>&1 && { echo "$m"; return; }; done; }
# The backends equal at the end, checked through the leader's config.
verify_equal() {
  cp "$work/$(leader).toml" "$work/verify.toml"
  target/release/chorus --config "$work/verify.toml" verify | tail -1
}
until curl -sf "http://127.0.0.1:$ETCD_PORT/health" >/dev/null; do sleep 0.1; done
for m in a b; do config "$m"; start "$m"; done
until [[ -n $(leader) ]]; do sleep 0.1; done
