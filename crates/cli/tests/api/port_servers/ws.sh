#!/bin/sh
# One WebSocket connection on stdin/stdout (nc -e): the handshake, then each
# client frame (masked, at most 125 bytes) sent back unmasked, until a close.
cr=$(printf '\r')
key=
while IFS= read -r line; do
  line=${line%"$cr"}
  [ -z "$line" ] && break
  case "$line" in
    [Ss]ec-[Ww]eb[Ss]ocket-[Kk]ey:*) key=${line#*:}; key=${key# } ;;
  esac
done
accept=$(printf '%s258EAFA5-E914-47DA-95CA-C5AB0DC85B11' "$key" | sha1sum | cut -c1-40 | xxd -r -p | base64)
printf 'HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n' "$accept"
byte() { b=$(dd bs=1 count=1 2>/dev/null | od -An -tu1); [ -n "$b" ] || exit 0; echo $b; }
while :; do
  b0=$(byte); b1=$(byte)
  op=$((b0 & 15)); len=$((b1 & 127))
  [ "$len" -le 125 ] || exit 1
  m0=$(byte); m1=$(byte); m2=$(byte); m3=$(byte)
  out="\\$(printf %o $((128 | op)))\\$(printf %o $len)"
  i=0
  while [ $i -lt $len ]; do
    case $((i % 4)) in 0) m=$m0 ;; 1) m=$m1 ;; 2) m=$m2 ;; 3) m=$m3 ;; esac
    out="$out\\$(printf %o $(( $(byte) ^ m )))"
    i=$((i + 1))
  done
  printf "$out"
  [ $op -eq 8 ] && exit 0
done
