#!/bin/sh
# Stores the request body in /tmp/up as it arrives and answers its SHA-256.
cr=$(printf '\r')
len=0
while IFS= read -r line; do
  line=${line%"$cr"}
  [ -z "$line" ] && break
  case "$line" in [Cc]ontent-[Ll]ength:*) len=${line#*:}; len=${len# } ;; esac
done
head -c "$len" > /tmp/up
sum=$(sha256sum < /tmp/up | cut -d' ' -f1)
printf 'HTTP/1.1 200 OK\r\nContent-Length: 64\r\nConnection: close\r\n\r\n%s' "$sum"
