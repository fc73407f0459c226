# Shared by the containerd suite, bench/containerd.sh and demo/containerd.sh (busybox sh):
# containerd's configuration for the lazyblk snapshotter, and the hosts.toml of a plain-HTTP
# registry.

# containerd_config SNAPSHOTTER SNAPSHOTTER_SOCKET CERTS_DIR [ROOT STATE ADDRESS]: the
# config.toml on stdout. SNAPSHOTTER is the CRI plugin's (lazyblk or overlayfs); without ROOT,
# STATE and ADDRESS containerd's defaults stay.
containerd_config() {
    echo 'version = 2'
    if [ $# -ge 6 ]; then
        printf 'root = "%s"\nstate = "%s"\n[grpc]\n  address = "%s"\n' "$4" "$5" "$6"
    fi
    cat << CONF
[proxy_plugins.lazyblk]
  type = "snapshot"
  address = "$2"
[plugins."io.containerd.grpc.v1.cri".containerd]
  snapshotter = "$1"
  disable_snapshot_annotations = false
[plugins."io.containerd.grpc.v1.cri".registry]
  config_path = "$3"
CONF
}

# registry_hosts CERTS_DIR HOST:PORT: containerd's hosts.toml for a plain-HTTP registry.
registry_hosts() {
    mkdir -p "$1/$2"
    printf 'server = "http://%s"\n[host."http://%s"]\n  capabilities = ["pull", "resolve"]\n' "$2" "$2" > "$1/$2/hosts.toml"
}
