Return-Path: <bob@example.com>
Delivered-To: mailroute-forward@example.com
Received: from EX01.corp.example.com (10.20.0.11) by EX02.corp.example.com
 (10.20.0.12) with Microsoft SMTP Server (version=TLS1_2,
 cipher=TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384) id 15.2.1544.4; Fri, 22 Nov 2024 15:20:01 +0000
From: Bob Okafor <bob@example.com>
To: "mailroute-forward@example.com" <mailroute-forward@example.com>
Subject: FW: Notes from Thursday's rollout meeting
Thread-Topic: Notes from Thursday's rollout meeting
Date: Fri, 22 Nov 2024 15:20:01 +0000
Message-ID: <DB9PR10MB5731A6C2E0F94B1D8E3F27A0B65C2@DB9PR10MB5731.corp.example.com>
Accept-Language: en-US
Content-Language: en-US
X-MS-Has-Attach: yes
X-MS-Exchange-Organization-AutoForwarded: true
X-MS-Exchange-Inbox-Rules-Loop: bob@example.com
Content-Type: multipart/mixed; boundary="_002_DB9PR10MB5731A6C2E0F94B1D8E3F27A0B65C2_"
MIME-Version: 1.0

--_002_DB9PR10MB5731A6C2E0F94B1D8E3F27A0B65C2_
Content-Type: text/plain; charset="us-ascii"
Content-Transfer-Encoding: 7bit

This message was forwarded by a rule in Bob Okafor's mailbox.

--_002_DB9PR10MB5731A6C2E0F94B1D8E3F27A0B65C2_
Content-Type: message/rfc822
Content-Disposition: attachment;
	creation-date="Fri, 22 Nov 2024 15:20:01 GMT";
	modification-date="Fri, 22 Nov 2024 15:20:01 GMT"

Return-Path: <frank.weber@customer.example>
Delivered-To: bob@example.com
Received: from mail.customer.example (mail.customer.example [198.51.100.40])
	by mail.example.com with ESMTPS id 4XwK7m3RbTz9sVq
	for <bob@example.com>; Fri, 22 Nov 2024 15:19:58 +0000
From: Frank Weber <frank.weber@customer.example>
To: Bob Okafor <bob@example.com>
Subject: Notes from Thursday's rollout meeting
Date: Fri, 22 Nov 2024 16:19:55 +0100
Message-ID: <5f3e8a21c0d94b7e@customer.example>
MIME-Version: 1.0
Content-Type: text/plain; charset=us-ascii
Content-Transfer-Encoding: 7bit

Bob,

Notes from Thursday, as agreed:

1. Site survey at the Leipzig warehouse is done; power and network are
   ready for the DX-200 controllers.
2. Installation starts the week of 9 December, two technicians from
   your side, one from ours.
3. Open point: who configures the VPN to the monitoring service? I think
   it is on us, but please confirm.

Have a good weekend,
Frank

--_002_DB9PR10MB5731A6C2E0F94B1D8E3F27A0B65C2_--
