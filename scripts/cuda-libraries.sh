# Sourced by gpu-check.sh and dp-check.sh.
#
# find_cuda_libraries PATTERN...: puts the folder holding each library on LD_LIBRARY_PATH when
# the dynamic loader does not find it by itself (a driver or toolkit outside ldconfig's
# folders, or pip's nvidia wheels). PATTERN is a file name with shell brackets, such as
# 'libnvrtc.so.1[23]'.
find_cuda_libraries() {
    local pattern found
    for pattern in "$@"; do
        if ldconfig -p 2>/dev/null | grep -q "${pattern//./\\.}\b"; then
            continue
        fi
        found=$(
            find /usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/local/cuda*/lib64 \
                /usr/local/cuda*/targets/*/lib /usr/lib/x86_64-linux-gnu /opt \
                /usr/local/lib/python3* /usr/lib/python3* \
                -name "$pattern*" -not -path '*/stubs/*' 2>/dev/null | sort -r | head -n 1
        )
        [ -n "$found" ] || continue
        found=$(dirname "$found")
        if [[ ":${LD_LIBRARY_PATH:-}:" != *":$found:"* ]]; then
            export LD_LIBRARY_PATH="$found${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
        fi
    done
}
