#!/bin/bash
# The API key file of `halo-mpi serve` (its first line is the key), made on first use: 32 random
# bytes as hex, readable by its owner only. Prints the file's path.
#   KEY_FILE=$(jobs/api-key.sh)                  # default: ~/.halo-mpi/api-key
#   API_KEY_FILE=/path/key jobs/api-key.sh
set -euo pipefail
FILE=${API_KEY_FILE:-$HOME/.halo-mpi/api-key}
if [ ! -s "$FILE" ]; then
    mkdir -p "$(dirname "$FILE")"
    (umask 077 && od -An -tx1 -N32 /dev/urandom | tr -d ' \n' > "$FILE" && echo >> "$FILE")
    echo "api-key.sh: a new key in $FILE" >&2
fi
echo "$FILE"
