#!/bin/sh
# A pinentry program for tests: speaks Assuan like pinentry-tty and "types" the PIN on the first
# line of the file named by $1 (no '%' in it). The name of every command it gets is appended to the
# file named by $2, so a test sees what the agent asked and how often.
echo "OK Pleased to meet you"
while IFS= read -r line; do
    echo "${line%% *}" >> "$2"
    case "$line" in
        GETPIN) printf 'D %s\nOK\n' "$(head -n 1 "$1")" ;;
        BYE) echo "OK closing connection"; exit 0 ;;
        *) echo OK ;;
    esac
done
