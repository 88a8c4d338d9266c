#!/bin/sh
echo "hello, ${1:-world} (from the hocus example)"
