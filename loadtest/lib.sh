# Shell helpers shared by the loadtest scripts (sourced, not run).

# Waits (up to a minute: a node under valgrind starts slowly) for a line matching pattern $2
# (default "https://") in log $1, and prints the address that follows it.
address() {
    local pattern=${2:-https://}
    for _ in $(seq 600); do
        if grep -q "$pattern" "$1"; then
            grep -o "$pattern[0-9.:]*" "$1" | head -1 | sed "s|$pattern||"
            return
        fi
        sleep 0.1
    done
    echo "no address in $1:" >&2
    cat "$1" >&2
    exit 1
}
