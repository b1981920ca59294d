#!/bin/sh
# A chunked answer in two parts; the second waits for /tmp/go, so the first
# can only reach the client if the relay streams.
cr=$(printf '\r')
while IFS= read -r line; do line=${line%"$cr"}; [ -z "$line" ] && break; done
printf 'HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n'
printf '6\r\nfirst\n\r\n'
i=0
while [ ! -e /tmp/go ] && [ $i -lt 900 ]; do sleep 0.1; i=$((i + 1)); done
printf '7\r\nsecond\n\r\n0\r\n\r\n'
