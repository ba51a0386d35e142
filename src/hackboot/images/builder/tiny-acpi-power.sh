#!/bin/sh
# hackboot tiny image: run by busybox acpid on an ACPI power button event (QMP system_powerdown).
echo "hackboot-tiny: ACPI power button, powering off" > /dev/console
exec /sbin/poweroff
