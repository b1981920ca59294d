#!/bin/sh
# Answers with /srv/marker and the request's head, so a test sees which
# sandbox answered and what reached it.
cr=$(printf '\r')
body="$(cat /srv/marker 2>/dev/null)
"
while IFS= read -r line; do
  line=${line%"$cr"}
  [ -z "$line" ] && break
  body="$body$line
"
done
printf 'HTTP/1.1 200 OK\r\nContent-Length: %s\r\nConnection: close\r\n\r\n%s' "${#body}" "$body"
