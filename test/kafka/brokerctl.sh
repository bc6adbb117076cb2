# shellcheck shell=bash
# brokerctl.sh - start, drive and stop mock_broker from test scripts (bash)
#
# This file owns the shell side of the test broker.  Source it:
#
#   source test/kafka/brokerctl.sh
#   bootstrap=$(broker_start "$dir" 3 4 points.events)  # brokers partitions topic
#   broker_cmd "$dir" "down all"     # waits for the broker's acknowledgement
#   broker_cmd "$dir" "up all"
#   broker_stop "$dir"
#
# Everything of one broker lives in DIR: broker.pid, bootstrap (the bootstrap
# servers, written by mock_broker once it serves), control (its command
# FIFO), control.ack (its acknowledgements) and broker.log (its stderr).
# Commands are listed in mock_broker.c.  MOCK_BROKER overrides the binary
# (default: mock_broker next to this file; build it with make -C test/kafka).
# Functions return non-zero and say why on stderr when something fails.

BROKERCTL_HOME=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
MOCK_BROKER=${MOCK_BROKER:-$BROKERCTL_HOME/mock_broker}

# _broker_alive PID - whether PID runs (a zombie does not count)
_broker_alive() {
    local state
    kill -0 "$1" 2>/dev/null || return 1
    state=$(awk '{ print $3 }' "/proc/$1/stat" 2>/dev/null)
    [[ $state != Z ]]
}

# broker_start DIR [brokers=3] [partitions=4] [topic=points.events]
# Starts mock_broker in the background, waits up to 10 s for its bootstrap
# file and prints the bootstrap servers.
broker_start() {
    local dir=$1 brokers=${2:-3} partitions=${3:-4} topic=${4:-points.events}
    local pid i

    if [[ -z $dir ]]; then
        echo "broker_start: usage: broker_start DIR [brokers] [partitions] [topic]" >&2
        return 2
    fi
    if [[ ! -x $MOCK_BROKER ]]; then
        echo "broker_start: $MOCK_BROKER not built (make -C $BROKERCTL_HOME)" >&2
        return 1
    fi
    mkdir -p "$dir" || return 1
    if [[ -f $dir/broker.pid ]] && _broker_alive "$(cat "$dir/broker.pid")"; then
        echo "broker_start: a broker already runs for $dir (pid $(cat "$dir/broker.pid"))" >&2
        return 1
    fi
    rm -f "$dir/bootstrap" "$dir/control.ack"
    # no stdout/stdin kept: $(broker_start ...) must not wait for the broker
    "$MOCK_BROKER" --brokers "$brokers" --topic "$topic" --partitions "$partitions" \
        --bootstrap-file "$dir/bootstrap" --control "$dir/control" \
        </dev/null >>"$dir/broker.log" 2>&1 &
    pid=$!
    echo "$pid" >"$dir/broker.pid"

    for ((i = 0; i < 100; i++)); do
        if [[ -s $dir/bootstrap ]]; then
            cat "$dir/bootstrap"
            return 0
        fi
        if ! _broker_alive "$pid"; then
            echo "broker_start: mock_broker exited; its log:" >&2
            cat "$dir/broker.log" >&2
            rm -f "$dir/broker.pid"
            return 1
        fi
        sleep 0.1
    done
    echo "broker_start: no bootstrap file after 10 s; stopping mock_broker" >&2
    broker_stop "$dir"
    return 1
}

# broker_cmd DIR "COMMAND"
# Sends one command and waits up to 10 s for its acknowledgement: returns 0
# on "ok COMMAND", 1 on "error COMMAND: why" (printed) or no answer.
broker_cmd() {
    local dir=$1 cmd=$2 pid before line alive i

    # the broker acknowledges the command without surrounding blanks
    cmd=${cmd#"${cmd%%[![:space:]]*}"}
    cmd=${cmd%"${cmd##*[![:space:]]}"}
    if [[ -z $dir || -z $cmd || $cmd == *$'\n'* ]]; then
        echo "broker_cmd: usage: broker_cmd DIR COMMAND" >&2
        return 2
    fi
    pid=$(cat "$dir/broker.pid" 2>/dev/null)
    if [[ -z $pid ]] || ! _broker_alive "$pid" || [[ ! -p $dir/control ]]; then
        echo "broker_cmd: no broker runs for $dir" >&2
        return 1
    fi
    before=0
    [[ -f $dir/control.ack ]] && before=$(wc -l <"$dir/control.ack")

    # the broker holds the FIFO open, so this open does not block; the
    # timeout guards against a broker that died meanwhile
    # shellcheck disable=SC2016  # $1 and $2 are the inner shell's arguments
    if ! timeout 10 bash -c 'printf "%s\n" "$1" >"$2"' _ "$cmd" "$dir/control"; then
        echo "broker_cmd: cannot write to $dir/control" >&2
        return 1
    fi

    for ((i = 0; i < 200; i++)); do
        # liveness first: an answer written before the broker exited
        # (as for "quit") is then read below
        alive=1
        _broker_alive "$pid" || alive=0
        # the first answer to this very command after the lines seen before
        line=$(tail -n +"$((before + 1))" "$dir/control.ack" 2>/dev/null |
            awk -v c="$cmd" '$0 == "ok " c || index($0, "error " c ": ") == 1 { print; exit }')
        if [[ $line == "ok $cmd" ]]; then
            return 0
        elif [[ -n $line ]]; then
            echo "broker_cmd: $line" >&2
            return 1
        fi
        if ((!alive)); then
            echo "broker_cmd: broker exited before answering '$cmd'" >&2
            return 1
        fi
        sleep 0.05
    done
    echo "broker_cmd: no acknowledgement of '$cmd' within 10 s" >&2
    return 1
}

# broker_stop DIR
# Stops the broker with SIGTERM (SIGKILL after 10 s); returns 0 when no
# broker runs for DIR any more.
broker_stop() {
    local dir=$1 pid i

    pid=$(cat "$dir/broker.pid" 2>/dev/null) || return 0
    if [[ -n $pid ]] && _broker_alive "$pid"; then
        kill -TERM "$pid" 2>/dev/null
        for ((i = 0; i < 100; i++)); do
            _broker_alive "$pid" || break
            sleep 0.1
        done
        if _broker_alive "$pid"; then
            echo "broker_stop: mock_broker $pid ignored SIGTERM, killing it" >&2
            kill -KILL "$pid" 2>/dev/null
        fi
        # reap it when it is our child; harmless otherwise
        wait "$pid" 2>/dev/null
    fi
    rm -f "$dir/broker.pid"
    return 0
}
