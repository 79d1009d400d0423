#!/bin/bash
# Check an MPICH hostfile before launching: every host must resolve, every slot count be a number.
# Hydra's own failure is a five-line dump after an ssh error; this is one line and exit 2.
#   jobs/check-hostfile.sh HOSTFILE
set -uo pipefail
file=${1:?usage: jobs/check-hostfile.sh HOSTFILE}
if [ ! -r "$file" ]; then
  echo "halo-mpi: error: hostfile $file not found or not readable" >&2; exit 2
fi
n=0
while IFS= read -r line || [ -n "$line" ]; do
  line=${line%%#*}; line=$(echo "$line" | tr -d '[:space:]')
  [ -z "$line" ] && continue
  host=${line%%:*}; slots=${line#"$host"}; slots=${slots#:}
  if [ -n "$slots" ] && ! [[ "$slots" =~ ^[0-9]+$ && "$slots" -ge 1 ]]; then
    echo "halo-mpi: error: hostfile $file: '$line': slots must be a whole number >= 1 (host:slots)" >&2; exit 2
  fi
  if ! getent hosts "$host" > /dev/null; then
    echo "halo-mpi: error: hostfile $file: host $host does not resolve; fix the name, /etc/hosts or DNS" >&2; exit 2
  fi
  n=$((n + 1))
done < "$file"
if [ "$n" -eq 0 ]; then
  echo "halo-mpi: error: hostfile $file lists no host" >&2; exit 2
fi
