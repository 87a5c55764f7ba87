# Shell functions shared by the checks that run the suite under qemu's
# user-mode emulation of another CPU (aarch64_check.sh, avx2_check.sh).
# Sourced, not run.

# write_march_wrapper PATH COMPILER FLAG
# Writes PATH: a compiler wrapper that runs COMPILER with each -march=native
# argument replaced by FLAG. The tests' compilers (torch.compile's C++ code,
# cpp_extension) ask for -march=native, which the compiler, running natively,
# would read as the build machine's CPU instead of the emulated one.
write_march_wrapper() {
  local path=$1 compiler=$2 flag=$3
  mkdir -p "$(dirname "$path")"
  cat > "$path" <<WRAPPER
#!/bin/sh
for a; do
  shift
  if [ "\$a" = "-march=native" ]; then set -- "\$@" $flag; else set -- "\$@" "\$a"; fi
done
exec "$compiler" "\$@"
WRAPPER
  chmod +x "$path"
}
