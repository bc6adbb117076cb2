#!/usr/bin/perl
# summarize.pl - the arithmetic of the benchmark scripts
#
#   summarize.pl ratio "B1 B2 .." "O1 O2 .."
#       pairs the runs (Bi, Oi): prints base_median ours_median
#       ratio_median ratio_min ratio_max (ratio = Oi / Bi)
#   summarize.pl pct FILE...
#       latencies in ms, one a line: prints p50 p99 count
#   summarize.pl median V1 V2 ...
#   summarize.pl table RESULTS EXTRAS MACHINE
#       the report: one row per workload (RESULTS, tab-separated:
#       workload baseline base_tps ours_tps ratio_med ratio_min ratio_max
#       ours_p50 ours_p99 base_p50 base_p99 errors target verdict note),
#       then the other figures (EXTRAS: name value target verdict note)
use strict;
use warnings;

# print rows (array refs; the first is the header) as an aligned text table
sub print_table {
    my @rows = @_;
    my @w;
    for my $row (@rows) {
        for my $i ( 0 .. $#$row ) {
            my $l = length( $row->[$i] // '' );
            $w[$i] = $l if !defined $w[$i] || $l > $w[$i];
        }
    }
    for my $row (@rows) {
        print join( ' | ', map { sprintf "%-*s", $w[$_], $row->[$_] // '' } 0 .. $#$row ), "\n";
        print join( '-+-', map { '-' x $w[$_] } 0 .. $#$row ), "\n" if $row == $rows[0];
    }
    return;
}

sub median {
    my @v = sort { $a <=> $b } @_;
    return 0 unless @v;
    my $n = @v;
    return $n % 2 ? $v[ ($n - 1) / 2 ] : ( $v[ $n / 2 - 1 ] + $v[ $n / 2 ] ) / 2;
}

my $cmd = shift // die "usage: summarize.pl ratio|pct|median|table ...\n";

if ( $cmd eq 'ratio' ) {
    my @b = split ' ', shift // '';
    my @o = split ' ', shift // '';
    my @r;
    for my $i ( 0 .. $#b ) {
        next unless defined $o[$i] && $b[$i] > 0;
        push @r, $o[$i] / $b[$i];
    }
    my @sr = sort { $a <=> $b } @r;
    printf "%.1f %.1f %.3f %.3f %.3f\n", median(@b), median(@o),
      median(@r), ( @sr ? ( $sr[0], $sr[-1] ) : ( 0, 0 ) );
}
elsif ( $cmd eq 'pct' ) {
    my @v;
    for my $f (@ARGV) {
        open my $fh, '<', $f or next;
        while (<$fh>) { chomp; push @v, $_ if /^[0-9.]+$/; }
    }
    @v = sort { $a <=> $b } @v;
    my $n = @v;
    if ( !$n ) { print "0 0 0\n"; exit 0; }
    my $p = sub { $v[ int( $_[0] * ( $n - 1 ) + 0.5 ) ] };
    printf "%.2f %.2f %d\n", $p->(0.5), $p->(0.99), $n;
}
elsif ( $cmd eq 'median' ) {
    printf "%.3f\n", median(@ARGV);
}
elsif ( $cmd eq 'table' ) {
    my ( $results, $extras, $machine ) = @ARGV;
    if ( $machine && open my $m, '<', $machine ) {
        print while <$m>;
        print "\n";
    }
    my @hdr = (
        'workload', 'baseline', 'base TPS', 'ours TPS', 'ratio', 'spread',
        'ours p50/p99 ms', 'base p50/p99 ms', 'errors ours/base', 'target', 'verdict'
    );
    my @rows = ( \@hdr );
    my @notes;
    if ( open my $r, '<', $results ) {
        while (<$r>) {
            chomp;
            my @f = split /\t/, $_, -1;
            push @rows, [
                $f[0], $f[1], $f[2], $f[3], $f[4], "$f[5]-$f[6]",
                "$f[7] / $f[8]", "$f[9] / $f[10]", $f[11], $f[12], $f[13]
            ];
            push @notes, "$f[0]: $f[14]" if defined $f[14] && $f[14] ne '';
        }
    }
    print_table(@rows);
    print "\n";
    my @xrows = ( [ 'figure', 'value', 'target', 'verdict' ] );
    if ( open my $x, '<', $extras ) {
        while (<$x>) {
            chomp;
            my @f = split /\t/, $_, -1;
            push @xrows, [ @f[ 0 .. 3 ] ];
            push @notes, "$f[0]: $f[4]" if defined $f[4] && $f[4] ne '';
        }
    }
    print_table(@xrows);
    if (@notes) {
        print "\nnotes:\n";
        print "  $_\n" for @notes;
    }
}
else {
    die "summarize.pl: unknown command $cmd\n";
}
